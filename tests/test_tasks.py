"""Property tests of the built-in generators (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optolab.tasks import IGNORE, FewshotSpec, make_task
from optolab.testing.strategies import repeat_tokens_specs

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def fewshot_specs(draw):
    n_labels = draw(st.integers(2, 8))
    context_pairs = draw(st.integers(1, 4))
    burstiness = draw(st.integers(1, context_pairs))
    k = 1 + context_pairs - burstiness
    n_labels = max(n_labels, k + 1)  # at least two label sets so one can be held out
    return FewshotSpec(
        n_train_classes=draw(st.integers(max(k, 2), 12)), n_test_classes=draw(st.integers(max(k, 2), 12)),
        n_exemplars=draw(st.integers(2, 5)), train_exemplars=1, dim=draw(st.integers(2, 24)),
        design=draw(st.sampled_from(["relu_lowrank", "lowrank", "relu", "isotropic"])),
        latent_dim=draw(st.integers(1, 6)), noise=draw(st.floats(0, 1)), context_pairs=context_pairs,
        burstiness=burstiness, n_labels=n_labels, heldout_label_frac=0.3 if math.comb(n_labels, k) >= 4 else 0.0,
        task_seed=draw(st.integers(0, 1000)))


@SETTINGS
@given(spec=fewshot_specs(), seed=st.integers(0, 2**31), step=st.integers(0, 10**6))
def test_fewshot_batches_are_deterministic_per_seed_and_step(spec, seed, step):
    task = make_task(spec)
    a, b = task.train_batch(seed, step, 8), task.train_batch(seed, step, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))
    assert torch.equal(a.targets, b.targets)
    assert a.inputs[0].dtype == torch.float32 and a.inputs[1].dtype == torch.long
    assert ((a.inputs[1] >= 0) & (a.inputs[1] < spec.n_labels)).all()


@SETTINGS
@given(spec=fewshot_specs(), seed=st.integers(0, 1000))
def test_fewshot_training_never_sees_heldout_labels_classes_or_exemplars(spec, seed):
    task = make_task(spec)
    batch = task.train_batch(seed, 0, 64)
    heldout = {tuple(s.tolist()) for s in task.label_sets["heldout"]}
    classes, ex = batch.extra["classes"], batch.extra["exemplar_ids"]
    assert (classes < spec.n_train_classes).all()
    assert (ex < spec.train_exemplars).all()
    labels = batch.inputs[1]
    query = batch.targets[:, -1]
    for row in range(batch.size):
        used = tuple(sorted(set(labels[row].tolist()) | {int(query[row])}))
        assert used not in heldout


@SETTINGS
@given(spec=fewshot_specs(), seed=st.integers(0, 1000))
def test_fewshot_labels_are_consistent_within_a_sequence_and_recoverable(spec, seed):
    task = make_task(spec)
    for split in task.eval_splits if task.label_sets["heldout"].numel() else ("fsl_train", "fsl_train_valex", "fsl_test_class"):
        batch = task.eval_batch(split, seed, 32)
        x, labels = batch.inputs
        classes = batch.extra["classes"]
        N = spec.context_pairs
        assert x.shape == (32, N + 1, spec.dim) and labels.shape == (32, N)
        assert batch.targets.shape == (32, 2 * N + 1)
        assert (batch.targets[:, :-1] == IGNORE).all()
        for row in range(32):
            # one label per class within a sequence, distinct classes get distinct labels
            mapping = {}
            for c, lab in zip(classes[row, :N].tolist(), labels[row].tolist()):
                assert mapping.setdefault(c, lab) == lab
            assert len(set(mapping.values())) == len(mapping)
            # the query's class appears in the context with the target label
            assert mapping[int(classes[row, -1])] == int(batch.targets[row, -1])
        # metadata: match mask marks exactly the label tokens equal to the target
        label_pos = torch.arange(1, 2 * N, 2)
        expect = labels == batch.targets[:, -1:]
        assert torch.equal(batch.match_mask[:, label_pos], expect)
        assert torch.equal(batch.nonmatch_mask[:, label_pos], ~expect)
        assert not batch.match_mask[:, ::2].any()
        assert batch.context_labels.sum(1).eq(spec.n_distinct).all()


@SETTINGS
@given(spec=fewshot_specs(), seed=st.integers(0, 1000))
def test_fewshot_eval_splits_use_what_they_claim(spec, seed):
    task = make_task(spec)
    heldout = {tuple(s.tolist()) for s in task.label_sets["heldout"]}
    valex = task.eval_batch("fsl_train_valex", seed, 32)
    assert (valex.extra["exemplar_ids"] >= spec.train_exemplars).all()
    test = task.eval_batch("fsl_test_class", seed, 32)
    assert (test.extra["classes"] >= spec.n_train_classes).all()
    if heldout:
        val = task.eval_batch("fsl_val_rl", seed, 32)
        for row in range(32):
            used = tuple(sorted(set(val.inputs[1][row].tolist()) | {int(val.targets[row, -1])}))
            assert used in heldout


def test_fewshot_singh_label_split_is_8_train_2_heldout_pairs():
    task = make_task(FewshotSpec())
    assert len(task.label_sets["train"]) == 8 and len(task.label_sets["heldout"]) == 2
    ten = make_task(FewshotSpec(n_labels=10))
    assert (len(ten.label_sets["train"]), len(ten.label_sets["heldout"])) == (36, 9)
    fifteen = make_task(FewshotSpec(n_labels=15))
    assert (len(fifteen.label_sets["train"]), len(fifteen.label_sets["heldout"])) == (84, 21)


@pytest.mark.parametrize("bad, field", [
    (dict(burstiness=3, context_pairs=2), "burstiness"),
    (dict(n_labels=2, context_pairs=3, burstiness=1), "n_labels"),
    (dict(noise=-1.0), "noise"),
    (dict(train_exemplars=5, n_exemplars=5), "train_exemplars"),
])
def test_impossible_fewshot_parameters_are_refused(bad, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        FewshotSpec(**bad)


@SETTINGS
@given(spec=repeat_tokens_specs(), seed=st.integers(0, 2**31), step=st.integers(0, 10**6))
def test_repeat_tokens_structure_and_determinism(spec, seed, step):
    task = make_task(spec)
    batch = task.train_batch(seed, step, 6)
    again = task.train_batch(seed, step, 6)
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.targets, again.targets)
    tokens, R = batch.tokens, spec.n_repeats
    assert tokens.shape == (6, 1 + spec.seq_len * R) == batch.targets.shape
    assert (tokens[:, 0] == task.bos).all() and (tokens[:, 1:] < spec.n_tokens).all()
    keep = batch.targets != IGNORE
    assert torch.equal(batch.targets[:, :-1][keep[:, :-1]], tokens[:, 1:][keep[:, :-1]])
    assert not keep[:, -1].any()
    for row in range(6):
        n_targets = int(keep[row].sum())
        # "repeats" drops the first token of copy 2 (unpredictable by induction)
        L = n_targets // R if spec.loss_on == "all" else (n_targets + 1) // (R - 1)
        assert (spec.seq_len_min or spec.seq_len) <= L <= spec.seq_len
        for r in range(1, R):  # copies repeat the first one
            assert torch.equal(tokens[row, 1 + r * L: 1 + (r + 1) * L], tokens[row, 1:1 + L])
        # induction targets: the key after an earlier occurrence holds the query's next token,
        # and every query in copies 2..R has exactly as many targets as earlier copies
        q, k = torch.nonzero(batch.induction_targets[row], as_tuple=True)
        assert torch.equal(tokens[row, k - 1], tokens[row, q])
        assert len(q) == sum(r * L for r in range(R))
