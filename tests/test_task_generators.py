"""What each new generator promises beyond the common contract (hypothesis properties)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optolab.tasks import IGNORE, BurstyClassesSpec, GaussianICLSpec, MarkovICLSpec, TriggerBigramSpec, make_task
from optolab.testing import (
    bursty_classes_specs,
    data_seeds,
    fixed_labels_specs,
    gaussian_icl_specs,
    markov_icl_specs,
    steps,
    trigger_bigram_specs,
)

SETTINGS = settings(max_examples=20, deadline=None)


# --- gaussian_icl (Reddy 2023) ---------------------------------------------------------------


@SETTINGS
@given(spec=gaussian_icl_specs(), seed=data_seeds, step=steps)
def test_gaussian_icl_bursty_sequences_repeat_each_class_B_times_and_hold_the_query(spec, seed, step):
    spec = spec.model_copy(update={"bursty_frac": 1.0, "novel_frac": 0.0})
    task = make_task(spec)
    batch = task.train_batch(seed, step, 16)
    cls, N, B = batch.extra["classes"], spec.context_pairs, spec.burstiness
    for row in cls.tolist():
        ctx, query = row[:N], row[N]
        assert all(ctx.count(c) == B for c in set(ctx)) and len(set(ctx)) == N // B
        assert query in ctx
    # labels are the fixed class labels, balanced over labels
    labels = torch.cat([batch.inputs[1], batch.targets[:, -1:]], dim=1)
    assert torch.equal(labels, task.class_labels[cls])
    assert torch.bincount(task.class_labels, minlength=spec.n_labels).unique().numel() == 1


@SETTINGS
@given(spec=gaussian_icl_specs(), seed=data_seeds)
def test_gaussian_icl_eval_splits_test_what_they_say(spec, seed):
    task = make_task(spec)
    N = spec.context_pairs
    iw = task.eval_batch("iw", seed, 32)
    assert not (iw.extra["classes"][:, :N] == iw.extra["classes"][:, N:]).any()  # query never in context
    assert torch.equal(iw.targets[:, -1], task.class_labels[iw.extra["classes"][:, N]])
    ic2 = task.eval_batch("ic2", seed, 32)  # labels permuted per sequence: consistent, not the fixed map
    fixed = task.class_labels[ic2.extra["classes"]]
    shown = torch.cat([ic2.inputs[1], ic2.targets[:, -1:]], dim=1)
    for f, s in zip(fixed.tolist(), shown.tolist()):
        assert len({(a, b) for a, b in zip(f, s)}) == len(set(f))  # a bijection on the labels present
    ic = task.eval_batch("ic", seed, 32)
    assert (ic.extra["classes"] >= spec.n_classes).all()


@SETTINGS
@given(noise=st.floats(0, 0.5), seed=data_seeds)
def test_gaussian_icl_items_scatter_around_their_class_mean_by_noise(noise, seed):
    spec = GaussianICLSpec(n_classes=32, n_labels=8, dim=256, noise=noise, burstiness=1)
    task = make_task(spec)
    batch = task.train_batch(seed, 0, 8)
    x, cls = batch.inputs[0], batch.extra["classes"]
    resid = x * math.sqrt(1 + noise**2) - task.means[cls]  # = noise · η, η ~ N(0, I/D)
    assert abs(resid.pow(2).sum(-1).mean().item() - noise**2) < 0.15 * noise**2 + 1e-6


def test_gaussian_icl_novel_sequences_use_fresh_classes_with_distinct_labels():
    spec = GaussianICLSpec(n_classes=64, n_labels=32, burstiness=1, novel_frac=1.0, distinct_labels=True)
    batch = make_task(spec).train_batch(0, 0, 64)
    assert (batch.extra["classes"] < 0).all()
    assert all(len(set(r)) == 8 for r in batch.inputs[1].tolist())  # 8 classes, 8 distinct labels


# --- bursty_classes (Chan 2022) ------------------------------------------------------------


@SETTINGS
@given(spec=bursty_classes_specs(), seed=data_seeds, step=steps)
def test_bursty_classes_labels_are_fixed_per_class_in_training(spec, seed, step):
    batch = make_task(spec).train_batch(seed, step, 16)
    cls = batch.extra["classes"]
    labels = torch.cat([batch.inputs[1], batch.targets[:, -1:]], dim=1)
    assert torch.equal(labels, cls % spec.n_labels)


@SETTINGS
@given(spec=bursty_classes_specs(), seed=data_seeds)
def test_bursty_classes_bursts_and_eval_splits(spec, seed):
    task = make_task(spec.model_copy(update={"bursty_frac": 1.0}))
    N, ways = spec.context_pairs, spec.bursty_classes
    train = task.train_batch(seed, 0, 16)
    cls = train.extra["classes"]
    assert ((cls[:, :N] == cls[:, N:]).sum(1) >= spec.shots).all()  # the query's class is a burst
    holdout = task.eval_batch("fewshot_holdout", seed, 16)
    hc = holdout.extra["classes"]
    assert all(sorted(row[:N].count(c) for c in set(row[:N])) == [N // ways] * ways for row in hc.tolist())
    assert (holdout.inputs[1] < ways).all()
    no_support = task.eval_batch("no_support", seed, 16).extra["classes"]
    assert not (no_support[:, :N] == no_support[:, N:]).any()


def test_bursty_classes_zipf_makes_low_ranks_common():
    task = make_task(BurstyClassesSpec(n_classes=100, n_holdout_classes=4, dim=8, zipf=1.0, bursty_frac=0.0))
    cls = task.train_batch(0, 0, 2000).extra["classes"].flatten()
    counts = torch.bincount(cls, minlength=100).double()
    assert counts[0] > 3 * counts[10] > 0  # p ∝ 1/rank: class 0 ≈ 11× class 10


# --- fixed_labels (Singh et al. 2025, the coopetition evaluators) ---------------------------


def _fixed_view(task, batch):
    N = task.spec.context_pairs
    cls, ctx_labels, target = batch.extra["classes"], batch.inputs[1], batch.extra["query_label"]
    match = cls[:, :N] == cls[:, N:]
    return N, cls, ctx_labels, target, match, batch.extra["exemplar_ids"]


@SETTINGS
@given(spec=fixed_labels_specs(), seed=data_seeds, step=steps)
def test_fixed_labels_training_is_bursty_with_fixed_labels(spec, seed, step):
    task = make_task(spec)
    batch = task.train_batch(seed, step, 32)
    N, cls, ctx_labels, target, match, ex = _fixed_view(task, batch)
    assert (match.sum(1) == 1).all()  # the query's class exactly once; the others are other classes
    assert all(len(set(row[:N])) == N for row in cls.tolist())
    assert torch.equal(torch.cat([ctx_labels, target[:, None]], 1), cls % spec.n_labels)
    assert (cls < spec.n_classes).all()
    if spec.match_query:  # MQ: the query is the very exemplar its class shows in the context
        assert torch.equal(ex[:, :N][match], ex[:, N])


@SETTINGS
@given(spec=fixed_labels_specs(), seed=data_seeds)
def test_fixed_labels_evaluators_separate_the_strategies(spec, seed):
    """Each split is solved by exactly the strategies the module docstring says: ICL (copy the
    matching item's label), IWL (the query's fixed label) and CIWL (IWL restricted to the
    context's labels)."""
    task = make_task(spec)
    for split in task.eval_splits:
        batch = task.eval_batch(split, seed, 32)
        N, cls, ctx_labels, target, match, ex = _fixed_view(task, batch)
        fixed = cls[:, N] % spec.n_labels
        in_ctx = (ctx_labels == target[:, None]).any(1)
        icl_answer = (ctx_labels * match).sum(1)  # the label the context gives the query's class
        assert (batch.targets[:, -1] == target).all() and (batch.targets[:, :-1] == IGNORE).all()
        if split in ("icl", "icl_mq", "flip_icl", "train"):
            assert (match.sum(1) == 1).all() and (icl_answer == target).all()
        if split in ("icl", "icl_mq"):
            assert (cls >= spec.n_classes).all() and all(len(set(r)) == N for r in ctx_labels.tolist())
        else:
            assert (cls < spec.n_classes).all()
        if split == "flip_icl":  # ICL right, IWL and CIWL wrong (and the fixed label is in the context)
            assert (target != fixed).all() and (ctx_labels == fixed[:, None]).any(1).all()
        if split in ("iwl", "ciwl", "train"):
            assert (target == fixed).all()
        if split == "iwl":
            assert not match.any() and not in_ctx.any()
        if split == "ciwl":  # the answer is in the context, on an item of another class
            assert not match.any() and in_ctx.all()
        if split != "train":  # the query is a different exemplar from its context item, except in MQ
            same = (ex[:, :N] == ex[:, N:]) & match
            assert same.any(1).all() if split == "icl_mq" else not same.any()


# --- markov_icl (Edelman 2024) -------------------------------------------------------------


@SETTINGS
@given(spec=markov_icl_specs(), seed=data_seeds)
def test_markov_chain_follows_its_own_transition_table(spec, seed):
    spec = spec.model_copy(update={"seq_len": 400, "order": 1})
    task = make_task(spec)
    batch = task.train_batch(seed, 0, 4)
    P, tok = batch.extra["transitions"], batch.tokens
    assert torch.allclose(P.sum(-1), torch.ones(()), atol=1e-5)
    k = spec.n_states
    for b in range(4):  # empirical transition counts agree with P (chi-square-ish bound)
        counts = torch.zeros(k, k)
        counts.index_put_((tok[b, :-1], tok[b, 1:]), torch.ones(tok.shape[1] - 1), accumulate=True)
        n = counts.sum(-1, keepdim=True)
        rows = n.squeeze(-1) >= 60
        expected = P[b] * n
        assert ((counts - expected)[rows].abs() <= 5 * expected[rows].sqrt() + 3).all()
    # targets are the next tokens from position order-1 on
    keep = batch.targets != IGNORE
    assert torch.equal(batch.targets[:, :-1][keep[:, :-1]], tok[:, 1:][keep[:, :-1]])


def test_markov_reference_levels_are_ordered_and_bayes_improves_with_context():
    task = make_task(MarkovICLSpec(n_states=3, seq_len=100, reference_sequences=2000))
    curves = task.reference_curves()
    late = slice(50, 99)
    assert curves["uniform"][late].mean() > curves["unigram"][late].mean() > curves["bayes"][late].mean()
    assert curves["bayes"][5:15].nanmean() > curves["bayes"][80:99].nanmean()
    assert curves["bayes"][-1].isnan()  # no next token at the last position


def test_markov_higher_order_depends_on_the_last_n_tokens():
    task = make_task(MarkovICLSpec(n_states=2, order=2, seq_len=50, reference_sequences=50))
    batch = task.eval_batch("val", 0, 8)
    assert batch.targets[:, 0].eq(IGNORE).all() and batch.targets[:, 1].ne(IGNORE).all()
    assert batch.extra["transitions"].shape == (8, 4, 2)


# --- trigger_bigram (Bietti 2023) -----------------------------------------------------------


@SETTINGS
@given(spec=trigger_bigram_specs(), seed=data_seeds, step=steps)
def test_a_trigger_is_always_followed_by_its_sequence_output(spec, seed, step):
    task = make_task(spec)
    batch = task.train_batch(seed, step, 8)
    tok, trig, out = batch.tokens, batch.extra["triggers"], batch.extra["outputs"]
    for b in range(tok.shape[0]):
        for j in range(trig.shape[1]):
            at = (tok[b, :-1] == trig[b, j]).nonzero().flatten()
            assert (tok[b, at + 1] == out[b, j]).all()
    if spec.fixed_triggers:
        assert torch.equal(trig[0], task.unigram.argsort(descending=True)[: spec.n_triggers])


@SETTINGS
@given(spec=trigger_bigram_specs(), seed=data_seeds)
def test_trigger_induction_split_scores_only_repeated_triggers(spec, seed):
    task = make_task(spec)
    batch = task.eval_batch("induction", seed, 8)
    tok, trig = batch.tokens, batch.extra["triggers"]
    q = (batch.targets != IGNORE).nonzero().tolist()
    for b, t in q:
        assert tok[b, t] in trig[b] and (tok[b, :t] == tok[b, t]).any()
    resolution = spec.resolution
    assert torch.allclose(task.bigram.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.allclose(task.bigram * resolution, (task.bigram * resolution).round(), atol=1e-4)


def test_trigger_background_is_the_bigram_table():
    spec = TriggerBigramSpec(n_tokens=8, seq_len=256, n_triggers=1, background_concentration=1.0)
    task = make_task(spec)
    batch = task.train_batch(0, 0, 64)
    tok, trig = batch.tokens, batch.extra["triggers"]
    prev, nxt = tok[:, :-1].flatten(), tok[:, 1:].flatten()
    ordinary = prev != trig[0, 0]
    counts = torch.zeros(8, 8)
    counts.index_put_((prev[ordinary], nxt[ordinary]), torch.ones(int(ordinary.sum())), accumulate=True)
    freq = counts / counts.sum(-1, keepdim=True)
    rows = [r for r in range(8) if r != int(trig[0, 0]) and counts[r].sum() > 500]
    assert rows and (freq[rows] - task.bigram[rows]).abs().max() < 0.06
