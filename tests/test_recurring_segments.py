"""recurring_segments: what the generator promises beyond the common contract (hypothesis
properties): recurrences are where ``induction_targets`` say, no fixed lag predicts them,
batches depend only on (seed, step)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optolab.tasks import IGNORE, RecurringSegmentsSpec, make_task
from optolab.tasks.tokens import induction_targets_from_tokens
from optolab.testing import data_seeds, recurring_segments_specs, steps

SETTINGS = settings(max_examples=20, deadline=None)


@SETTINGS
@given(spec=recurring_segments_specs(), seed=data_seeds, step=steps)
def test_copies_repeat_their_source_and_recurrence_positions_are_predictable(spec, seed, step):
    batch = make_task(spec).train_batch(seed, step, 8)
    tok, src, recur = batch.tokens, batch.extra["source"], batch.extra["recurrence"]
    T = spec.seq_len
    pos = torch.arange(T).expand_as(tok)
    copied = src >= 0
    # a faithful copy equals its source, which lies min_gap..max_gap positions back
    assert torch.equal(tok[copied], tok.gather(1, src.clamp_min(0))[copied])
    gap = (pos - src)[copied]
    assert ((gap >= spec.min_gap) & (gap <= spec.longest_gap)).all()
    # a recurrence position's next token is the token after its source
    b, q = recur.nonzero(as_tuple=True)
    assert (q < T - 1).all()
    assert torch.equal(tok[b, q + 1], tok[b, src[b, q] + 1]) and torch.equal(src[b, q + 1], src[b, q] + 1)


@SETTINGS
@given(spec=recurring_segments_specs(), seed=data_seeds)
def test_induction_targets_are_olssons_strict_targets_at_the_recurrences(spec, seed):
    task = make_task(spec)
    for split in task.eval_splits:
        batch = task.eval_batch(split, seed, 8)
        tok, src, recur, it = batch.tokens, batch.extra["source"], batch.extra["recurrence"], batch.induction_targets
        assert torch.equal(it.any(-1), recur)  # queries: exactly the recurrence positions
        assert torch.equal(it, induction_targets_from_tokens(tok, recur))  # keys after earlier x_q, no lag
        b, q = recur.nonzero(as_tuple=True)
        assert it[b, q, src[b, q] + 1].all()  # the key after the copied source is always a target
        if split == "copies":
            assert torch.equal(batch.targets != IGNORE, recur)
        else:
            assert (batch.targets[:, :-1] != IGNORE).all()


@settings(max_examples=10, deadline=None)
@given(seed=data_seeds, lag=st.integers(1, 6))
def test_no_fixed_lag_predicts_the_recurrences(seed, lag):
    """Attending ``lag`` past Olsson's targets (a lagged previous-token circuit) gives the right
    token at only part of the recurrence positions; the strict targets give it at all of them."""
    task = make_task(RecurringSegmentsSpec(noise=0.0))
    batch = task.eval_batch("val", seed, 256)
    src, recur = batch.extra["source"], batch.extra["recurrence"]
    b, q = recur.nonzero(as_tuple=True)
    key = src[b, q] + 1 + lag  # the lagged circuit's key: causal only if it lies at or before q
    reachable = key <= q
    assert reachable.float().mean() < 0.9
    # and a fixed offset back from the query (a positional copier) does not find the copy either
    offset = torch.bincount((q - src[b, q]).flatten())
    assert offset.max() < 0.25 * len(q)


@SETTINGS
@given(spec=recurring_segments_specs(), seed=data_seeds, step=steps)
def test_batches_depend_only_on_seed_and_step(spec, seed, step):
    a, b = make_task(spec), make_task(spec)
    x, y = a.train_batch(seed, step, 4), b.train_batch(seed, step, 4)
    assert torch.equal(x.tokens, y.tokens) and torch.equal(x.extra["source"], y.extra["source"])
    assert torch.equal(a.eval_batch("val", seed, 4).tokens, b.eval_batch("copies", seed, 4).tokens)


def test_recurrences_grow_with_context_and_the_background_is_the_table():
    task = make_task(RecurringSegmentsSpec(noise=0.0, skip_scale=0.0))
    batch = task.train_batch(0, 0, 512)
    recur = batch.extra["recurrence"].float()
    assert recur[:, 100:120].mean() > 1.3 * recur[:, 5:20].mean()  # later positions recur more (ICL score)
    # background transitions follow the fixed bigram table
    tok, src = batch.tokens, batch.extra["source"]
    bg = (src[:, 1:] < 0)
    prev, nxt = tok[:, :-1][bg], tok[:, 1:][bg]
    p = task.last_logits.softmax(-1)[prev, nxt]
    assert -p.log().mean() < task.reference_losses()["background entropy"] + 0.1


def test_generation_is_fast():
    import time

    task = make_task(RecurringSegmentsSpec())
    task.train_batch(0, 0, 32)
    t0 = time.perf_counter()
    for step in range(5):
        task.train_batch(0, step, 32)
    assert (time.perf_counter() - t0) / 5 < 0.05  # 50 ms a batch of 32 × 128 (≈5 ms measured)
