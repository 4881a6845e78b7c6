"""Measures on hand-built patterns and weights give known values."""

from __future__ import annotations

import pytest
import torch

from optolab.measures import (
    composition_scores,
    copying_scores,
    induction_strength,
    prefix_matching,
    previous_token,
    repeat_probe,
)
from optolab.model.transformer import build_model
from optolab.tasks.tokens import repeat_induction_targets
from tests.conftest import tiny_config

pytestmark = pytest.mark.numerics  # re-run under other CPU kernels (tests/kernel_choices.py)


def prev_token_pattern(b, h, n):
    p = torch.zeros(b, h, n, n)
    p[:, :, 0, 0] = 1
    i = torch.arange(1, n)
    p[:, :, i, i - 1] = 1
    return p


def uniform_pattern(b, h, n):
    return torch.tril(torch.ones(n, n)).div(torch.arange(1, n + 1)[:, None]).expand(b, h, n, n)


def test_previous_token_score_is_one_for_a_perfect_head_and_zero_corrected_for_uniform():
    raw, corrected = previous_token(prev_token_pattern(2, 3, 6))
    torch.testing.assert_close(raw, torch.ones(3))
    torch.testing.assert_close(corrected, torch.ones(3))
    raw_u, corrected_u = previous_token(uniform_pattern(2, 3, 6))
    torch.testing.assert_close(corrected_u, torch.zeros(3), atol=1e-6, rtol=0)
    assert (raw_u > 0).all() and (raw_u < 1).all()


def test_induction_strength_perfect_wrong_and_split_attention():
    b, h, n = 4, 2, 5
    match = torch.zeros(b, n, dtype=torch.bool)
    nonmatch = torch.zeros(b, n, dtype=torch.bool)
    match[:, 1], nonmatch[:, 3] = True, True
    p = torch.zeros(b, h, n, n)
    p[:, 0, -1, 1] = 1.0  # head 0 attends to the correct label token
    p[:, 1, -1, 3] = 1.0  # head 1 to the wrong one
    torch.testing.assert_close(induction_strength(p, match, nonmatch), torch.tensor([1.0, -1.0]))
    s = 0.75  # perfect match at strength s gives 2s - 1 (ANCHORS §2)
    q = torch.zeros(b, 1, n, n)
    q[:, 0, -1, 1], q[:, 0, -1, 3] = s, 1 - s
    torch.testing.assert_close(induction_strength(q, match, nonmatch), torch.tensor([2 * s - 1]))


def test_prefix_matching_is_one_for_a_perfect_induction_pattern():
    L, R = 3, 3
    targets = repeat_induction_targets(L, R, prefix=1)[0]
    n = targets.shape[0]
    p = torch.zeros(1, 2, n, n)
    p[:, :, torch.arange(n), torch.arange(n)] = 1.0  # head 1: attends to itself
    rows = targets.any(-1)
    weights = targets[rows].float() / targets[rows].sum(-1, keepdim=True)
    p[0, 0, rows] = weights  # head 0: spreads over all earlier-occurrence successors
    torch.testing.assert_close(prefix_matching(p, targets[None]), torch.tensor([1.0, 0.0]))


def test_repeat_probe_follows_olsson_and_scales_to_short_contexts():
    probe = repeat_probe(n_tokens=50, bos=50, n_ctx=200, n=10, seed=0)
    assert probe.tokens.shape == (10, 1 + 25 * 4)
    short = repeat_probe(n_tokens=50, bos=50, n_ctx=21, n=10, seed=0)
    assert short.tokens.shape == (10, 21)
    assert repeat_probe(n_tokens=50, bos=50, n_ctx=5, n=10, seed=0) is None


def test_composition_scores_zero_for_orthogonal_and_one_for_aligned_subspaces():
    model = build_model(tiny_config(n_layers=2, n_heads=2, d_model=4, d_head=2), 0)
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    with torch.no_grad():
        for W in (a0.W_O, a1.W_Q, a1.W_K, a1.W_V):
            W.zero_()
        a0.W_O[0, 0, 0] = 1.0  # head 0 writes residual dim 0 (rank 1)
        a1.W_Q[0, 0, 0] = 2.0  # layer-1 head 0 reads dim 0 as query: aligned
        a1.W_K[3, 0, 1] = 1.0  # and dim 3 as key: orthogonal
        a1.W_V[0, 0, 0] = a1.W_V[1, 0, 1] = 1.0  # value reads dims 0 and 1: half aligned
        a0.W_O[1, 1, 2] = 1.0
        a1.W_Q[2, 1, 0] = 1.0
    s = composition_scores(model)
    torch.testing.assert_close(s["comp_q"][0, 0, 1, 0], torch.tensor(1.0))
    torch.testing.assert_close(s["comp_k"][0, 0, 1, 0], torch.tensor(0.0))
    torch.testing.assert_close(s["comp_v"][0, 0, 1, 0], torch.tensor(2 ** -0.5))
    torch.testing.assert_close(s["comp_q"][0, 1, 1, 1], torch.tensor(1.0))
    torch.testing.assert_close(s["comp_q"][0, 1, 1, 0], torch.tensor(0.0))
    assert torch.isnan(s["comp_q"][1, 0, 0, 0])  # no composition backwards


def test_copying_score_is_high_for_an_identity_ov_and_low_for_an_anti_copier():
    cfg = tiny_config(n_layers=1, n_heads=2, d_model=8, d_head=4, d_vocab=8, d_out=8, layer_norm=False,
                      final_ln=False, unembed_bias=False)
    model = build_model(cfg, 0)
    with torch.no_grad():
        model.W_E.copy_(torch.eye(8))
        model.W_U.copy_(torch.eye(8))
        attn = model.blocks[0].attn
        attn.W_V.zero_(), attn.W_O.zero_()
        for i in range(4):  # head 0 copies dims 0-3 through, head 1 negates them
            attn.W_V[i, 0, i] = 1.0
            attn.W_O[0, i, i] = 1.0
            attn.W_V[i, 1, i] = 1.0
            attn.W_O[1, i, i] = -1.0
    scores = copying_scores(model, torch.arange(4))
    assert scores[0, 0] > 0.9
    assert scores[0, 1] < -0.9


def test_lagged_prefix_matching_finds_a_head_that_attends_past_olssons_target():
    from optolab.measures.attention import lagged_prefix_matching, prefix_matching
    from optolab.tasks.tokens import repeat_induction_targets

    targets = repeat_induction_targets(seq_len=8, n_repeats=2, prefix=1)  # [1, 17, 17]
    n = targets.shape[-1]
    pattern = torch.zeros(1, 2, n, n)
    pattern[:, :, torch.arange(n), 0] = 1.0  # default: attend BOS
    for q in range(n):
        keys = targets[0, q].nonzero().flatten()
        if len(keys):
            pattern[0, :, q] = 0
            pattern[0, 0, q, keys[0]] = 1.0  # head 0: Olsson's target
            pattern[0, 1, q, keys[0] + 3] = 1.0  # head 1: three positions later (a lag-3 circuit)
    strict = prefix_matching(pattern, targets)
    best, lag = lagged_prefix_matching(pattern, targets, max_lag=5)
    assert strict.tolist() == [1.0, 0.0]
    assert best.tolist() == [1.0, 1.0] and lag.tolist() == [0.0, 3.0]


def test_in_context_copying_is_one_for_a_copying_ov_and_minus_one_for_an_anti_copier():
    """Head 0's OV is the identity, head 1's its negative; the residual at each label token is that
    label's one-hot; the query attends only to label tokens."""
    from types import SimpleNamespace

    from optolab.measures.builtin.icl_copying import icl_copying_scores

    d, n_lab, b = 5, 2, 3
    W_V = torch.zeros(d, 2, d)
    W_O = torch.zeros(2, d, d)
    W_V[:, 0], W_V[:, 1] = torch.eye(d), torch.eye(d)
    W_O[0], W_O[1] = torch.eye(d), -torch.eye(d)
    block = SimpleNamespace(attn=SimpleNamespace(W_V=W_V, W_O=W_O))
    model = SimpleNamespace(cfg=SimpleNamespace(n_heads=2), blocks=[block], ln_final=torch.nn.Identity(),
                            W_U=torch.eye(d))
    labels = torch.tensor([[0, 3], [2, 1], [4, 4]])
    x = torch.zeros(b, 2 * n_lab + 1, d)
    x[:, 1::2][torch.arange(b)[:, None], torch.arange(n_lab), labels] = 1.0
    pattern = torch.zeros(b, 2, 2 * n_lab + 1, 2 * n_lab + 1)
    pattern[:, :, -1, 1::2] = 0.5
    scores = icl_copying_scores(model, [x], [pattern], labels)
    assert torch.allclose(scores[0], torch.tensor([1.0, -1.0]))


def test_in_context_copying_rows_come_only_for_exemplar_label_tasks(tmp_path):
    from optolab.protocol.loader import validate_protocol
    from optolab.training.trainer import train

    from .conftest import fewshot_protocol, repeat_protocol

    few = train(validate_protocol(fewshot_protocol(steps=10)), tmp_path / "f", progress=False).run_dir.metrics()
    rows = few[few.metric == "icl_copying"]
    from optolab.tasks import make_task

    main = make_task(validate_protocol(fewshot_protocol(steps=10)).task).main_split
    assert len(rows) and set(rows.split) == {main}
    assert rows.value.between(-1, 1).all()
    tok = train(validate_protocol(repeat_protocol(steps=10)), tmp_path / "t", progress=False).run_dir.metrics()
    assert not (tok.metric == "icl_copying").any()


def test_the_loss_trajectory_finds_a_known_turn_and_its_variance():
    """Per-example losses move along one direction, then turn onto another at eval 10: the
    trajectory's first two components explain it all and the turn is a 90-degree corner there."""
    import numpy as np

    from optolab.measures.trajectory import pca, project, speed, turning

    rng = np.random.default_rng(0)
    u, v = rng.normal(size=50), rng.normal(size=50)
    v -= u * (u @ v) / (u @ u)  # orthogonal directions in position space
    t = np.arange(21, dtype=float)
    X = np.outer(np.minimum(t, 10), u) + np.outer(np.maximum(t - 10, 0), v) + 1.0
    traj = pca(X, t * 100, k=3)
    assert traj.explained[:2].sum() > 0.999
    angles = turning(traj)
    # The path's rounding error is the SVD's, ~1e-14 relative; turning() (Kahan's atan2 form) turns
    # it into an angle error of the same order in radians at every angle, so 1e-9 degrees is four
    # orders of margin on any BLAS kernel. arccos of a cosine misses by ~1e-6 degrees near 0.
    assert abs(angles[9] - 90) < 1e-9 and np.allclose(np.delete(angles, 9), 0, atol=1e-9)
    assert np.allclose(speed(traj)[:10], np.linalg.norm(u) / 100)
    again = project(X + 0.0, t * 100, traj)  # projecting a run onto its own components
    assert np.allclose(again.path, traj.path)


def test_per_example_losses_round_trip_and_a_resumed_run_keeps_the_same_arrays(tmp_path):
    import numpy as np

    from optolab.protocol.loader import validate_protocol
    from optolab.training import per_example
    from optolab.training.trainer import train

    from .conftest import fewshot_protocol

    data = fewshot_protocol(steps=40)
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 20}}
    full = train(validate_protocol(data), tmp_path / "full", progress=False)
    steps, seqs, arrays = per_example.load(tmp_path / "full")
    df = full.run_dir.metrics()
    assert list(steps) == sorted(df.step.unique()) and set(arrays) == set(full.task.eval_splits)
    split = full.task.main_split
    loss = df[(df.split == split) & (df.metric == "loss")].set_index("step").value
    # the mean of the stored losses is the eval's loss (to float16's precision)
    assert np.allclose(arrays[split].mean(1), loss.loc[steps].to_numpy(), rtol=2e-3)
    train(validate_protocol(data), tmp_path / "cut", progress=False, stop_after=30)  # evals past the checkpoint
    train(validate_protocol(data), tmp_path / "cut", progress=False)
    s2, _, a2 = per_example.load(tmp_path / "cut")
    assert list(s2) == list(steps) and all(np.array_equal(a2[k], arrays[k]) for k in arrays)


@pytest.mark.parametrize("final_ln", [True, False])
def test_in_context_copying_logits_equal_the_direct_computation(final_ln):
    """The copying score's per-head logits, taken through the final LayerNorm as forms of the
    head's values, equal ln_final(v W_O) W_U computed directly."""
    from optolab.measures.builtin.icl_copying import head_logits

    model = build_model(tiny_config(final_ln=final_ln, n_heads=4, d_model=16, d_head=4), 3)
    if final_ln:  # a LayerNorm that is not the identity at init
        with torch.no_grad():
            model.ln_final.w.mul_(1.5)
            model.ln_final.b.add_(0.2)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 3, 4, 4, generator=g) * 3
    W_O = model.blocks[1].attn.W_O
    direct = model.ln_final(torch.einsum("bnhe,hed->bnhd", v, W_O)) @ model.W_U
    torch.testing.assert_close(head_logits(model, W_O, v), direct, rtol=1e-5, atol=1e-5)


def test_icl_copying_of_a_head_with_no_role_is_chance_not_zero():
    """Random OV circuits reading residuals that carry nothing about the label: every head scores
    2/N − 1 (the own label gets 1/N of the share on average), −0.6 for 5 labels, not 0."""
    from types import SimpleNamespace

    from optolab.measures.builtin.icl_copying import chance, icl_copying_scores

    torch.manual_seed(0)
    d, n_lab, b, heads, n_out = 16, 2, 4000, 4, 5
    block = SimpleNamespace(attn=SimpleNamespace(W_V=torch.randn(d, heads, 4), W_O=torch.randn(heads, 4, d)))
    model = SimpleNamespace(cfg=SimpleNamespace(n_heads=heads), blocks=[block], ln_final=torch.nn.Identity(),
                            W_U=torch.randn(d, n_out))
    labels = torch.randint(0, n_out, (b, n_lab))
    x = torch.randn(b, 2 * n_lab + 1, d)  # independent of the labels
    pattern = torch.softmax(torch.randn(b, heads, 2 * n_lab + 1, 2 * n_lab + 1), -1)
    scores = icl_copying_scores(model, [x], [pattern], labels)[0]
    assert chance(5) == pytest.approx(-0.6)
    # each head's score is a mean of b bounded terms in [-1, 1]: its standard error is below 1/sqrt(b)
    assert (scores - chance(n_out)).abs().max() < 4 / b**0.5, scores
    assert (scores < -0.4).all()  # far from 0, where a reader would put "no copying"


def test_most_recent_prefix_matching_is_stricter_and_both_have_a_uniform_baseline():
    from optolab.measures.attention import most_recent, uniform_prefix_matching

    L, R = 3, 3
    targets = repeat_induction_targets(L, R, prefix=1)[0]
    n = targets.shape[0]
    recent = most_recent(targets[None])[0]
    rows = targets.any(-1)
    assert torch.equal(recent.any(-1), rows) and (recent.sum(-1) <= 1).all()
    assert torch.equal(recent[rows].float().argmax(-1), (targets[rows] * torch.arange(n)).argmax(-1))
    p = torch.zeros(1, 3, n, n)
    p[0, 0, rows] = targets[rows].float() / targets[rows].sum(-1, keepdim=True)  # spread over every occurrence
    p[0, 1, rows] = recent[rows].float()  # the most recent occurrence's successor only
    p[0, 2] = torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]  # a head with no role: uniform
    olsson, strict = prefix_matching(p, targets[None]), prefix_matching(p, recent[None])
    torch.testing.assert_close(olsson[:2], torch.tensor([1.0, 1.0]))
    # copy k's queries have k − 1 earlier occurrences: the spreading head gets 1/(k−1) of it
    torch.testing.assert_close(strict[:2], torch.tensor([(1 + 1 / 2) / 2, 1.0]))
    assert olsson[2].item() == pytest.approx(uniform_prefix_matching(targets[None]), abs=1e-6)
    assert strict[2].item() == pytest.approx(uniform_prefix_matching(recent[None]), abs=1e-6)
    assert 0 < uniform_prefix_matching(recent[None]) < uniform_prefix_matching(targets[None]) < 0.5


def test_the_recent_prefix_matching_option_adds_its_rows(tmp_path):
    from optolab.protocol.loader import validate_protocol
    from optolab.training.trainer import train

    from .conftest import repeat_protocol

    data = repeat_protocol(steps=10)
    data["measures"] = {**data.get("measures", {}), "recent_prefix_matching": True}
    df = train(validate_protocol(data), tmp_path / "r", progress=False).run_dir.metrics()
    both = df[df.metric.isin(["prefix_matching", "prefix_matching_recent"])]
    wide = both.pivot_table(index=["step", "split", "layer", "head"], columns="metric", values="value")
    assert len(wide) and {"probe_repeat"} <= set(wide.index.get_level_values("split"))
    assert (wide.prefix_matching_recent <= wide.prefix_matching + 1e-6).all()  # a subset of the targets
    off = train(validate_protocol(repeat_protocol(steps=10)), tmp_path / "o", progress=False).run_dir.metrics()
    assert not (off.metric == "prefix_matching_recent").any()  # off by default
