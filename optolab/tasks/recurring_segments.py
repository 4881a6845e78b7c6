"""Recurring segments on a Markov background: a token task where induction is the natural solution.

Rules:
- Tokens are ids ``0..n_tokens−1``; no BOS. Every sequence is ``seq_len`` tokens, next-token loss
  at every position whose next token exists (split ``val`` and training).
- Background: a fixed random chain drawn from ``task_seed``. The next token's logits are
  ``A[x_t] + B[x_{t−1}]``, with ``A`` and ``B`` i.i.d. normal of standard deviation
  ``bigram_scale`` and ``skip_scale`` (``skip_scale: 0`` is a plain bigram chain). The token
  before the previous one is the part a one-layer model can only read through a
  previous-token head, so such a head pays before any induction does. The first token is uniform.
- Recurrences: at every position outside a recurrence a new one starts with probability
  ``copy_rate``. It draws a gap ``Δ`` (log-uniform over ``[min_gap, max_gap]``, so short gaps
  are common) and a length ``m`` (uniform over ``[min_len, max_len]``); if ``Δ ≤ t`` the next
  ``m`` tokens copy the tokens ``Δ`` positions earlier (``x_t = x_{t−Δ}``; ``Δ < m`` repeats a
  period), else nothing starts. Each copied token is replaced by a uniform random token with
  probability ``noise``. Gaps and lengths vary per recurrence, so neither position nor a fixed
  offset predicts a recurrence, and the further into the context, the more of it recurs.
- A *recurrence position* ``q`` is one whose token is a faithful copy and whose next token is the
  next faithful copy of the same recurrence: its target is the token after an earlier
  occurrence of ``x_q``. Split ``copies`` takes the loss only there (an ICL split); ``val``
  everywhere. Both splits are the same sequences (redrawn from the next stream in the rare case
  that not one position of the eval set recurs).
- ``induction_targets[b, q, k]`` (both splits): for every recurrence position ``q``, every key
  ``k ≤ q`` whose previous token equals ``x_q`` (Olsson et al.'s prefix-matching targets, with no
  lag). A circuit that attends ``d`` positions past them (previous-token heads looking ``d + 1``
  and ``d`` back, which solves exact repeats of one segment equally well) fails whenever
  ``Δ ≤ d``, and scores near 0 on them.
- ``Batch.extra``: ``source`` ``[b, T]`` (the position a faithful copy was copied from, −1
  elsewhere) and ``recurrence`` ``[b, T]`` (the recurrence-position mask).
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from optolab.core.errors import SpecError
from optolab.tasks.base import IGNORE, Batch, TaskSpec, rng
from optolab.tasks.tokens import NextTokenTask, induction_targets_from_tokens, next_token_targets

SPLITS = ("val", "copies")


class RecurringSegmentsSpec(TaskSpec):
    kind: Literal["recurring_segments"] = "recurring_segments"
    n_tokens: int = Field(64, ge=2, description="vocabulary size")
    seq_len: int = Field(128, ge=4, description="tokens per sequence (the model's context)")
    bigram_scale: float = Field(2.0, ge=0, description="std of the background logits on the last token")
    skip_scale: float = Field(0.0, ge=0, description="std of the background logits on the token before it")
    copy_rate: float = Field(0.05, gt=0, le=1, description="chance that a recurrence starts at a free position")
    min_len: int = Field(3, ge=2, description="shortest recurrence")
    max_len: int = Field(12, ge=2, description="longest recurrence")
    min_gap: int = Field(1, ge=1, description="shortest distance back to the copied tokens")
    max_gap: int | None = Field(None, ge=1, description="longest distance back (default: seq_len − 1)")
    noise: float = Field(0.0, ge=0, lt=1, description="chance that a copied token is replaced by a random one")

    @model_validator(mode="after")
    def _consistent(self) -> RecurringSegmentsSpec:
        if self.min_len > self.max_len:
            raise SpecError("min_len", f"min_len ({self.min_len}) exceeds max_len ({self.max_len}).",
                            "set min_len <= max_len.")
        if self.max_gap is not None and self.min_gap > self.max_gap:
            raise SpecError("min_gap", f"min_gap ({self.min_gap}) exceeds max_gap ({self.max_gap}).",
                            "set min_gap <= max_gap.")
        if self.min_gap >= self.seq_len - 1:
            raise SpecError("min_gap", f"min_gap ({self.min_gap}) leaves no room for a recurrence in "
                            f"{self.seq_len} tokens.", f"use min_gap <= {self.seq_len - 2}.")
        return self

    @property
    def longest_gap(self) -> int:
        return min(self.max_gap or self.seq_len - 1, self.seq_len - 1)

    def static_bytes(self) -> int:
        return 8 * self.n_tokens * self.n_tokens


class RecurringSegmentsTask(NextTokenTask):
    """Recurring segments on a Markov background: noisy copies at random gaps, next-token loss."""

    kind = "recurring_segments"
    Spec = RecurringSegmentsSpec
    spec: RecurringSegmentsSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        task_seeds = st.integers(0, 2**31 - 1)

        @st.composite
        def draw_spec(draw: Any) -> RecurringSegmentsSpec:
            seq_len = draw(st.integers(8, 48))
            min_len = draw(st.integers(2, 6))
            min_gap = draw(st.integers(1, 4))
            return RecurringSegmentsSpec(
                n_tokens=draw(st.integers(2, 40)), seq_len=seq_len, bigram_scale=draw(st.sampled_from([0.0, 1.0, 3.0])),
                skip_scale=draw(st.sampled_from([0.0, 1.0])), copy_rate=draw(st.sampled_from([0.2, 0.5, 1.0])),
                min_len=min_len, max_len=draw(st.integers(min_len, 12)), min_gap=min_gap,
                max_gap=draw(st.one_of(st.none(), st.integers(min_gap, seq_len))), noise=draw(st.sampled_from([0.0, 0.2])),
                task_seed=draw(task_seeds))

        return draw_spec()

    def __init__(self, spec: RecurringSegmentsSpec) -> None:
        super().__init__(spec)
        g = rng(spec.task_seed, 0)
        V = spec.n_tokens
        self.last_logits = spec.bigram_scale * torch.randn(V, V, generator=g, dtype=torch.float64)
        self.skip_logits = spec.skip_scale * torch.randn(V, V, generator=g, dtype=torch.float64)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return SPLITS

    @property
    def icl_splits(self) -> tuple[str, ...]:
        return ("copies",)

    @cached_property
    def _background_entropy(self) -> float:
        """Mean entropy of the background's next token, over a long background-only walk."""
        tokens = self._sample(rng(self.spec.task_seed, 303), 64, recurrences=False).tokens
        logits = self._logits(tokens[:, 1:-1].numpy(), tokens[:, :-2].numpy())
        logp = torch.from_numpy(logits).log_softmax(-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    def reference_losses(self) -> dict[str, float]:
        s = self.spec
        return {f"ln {s.n_tokens} (uniform)": math.log(s.n_tokens), "background entropy": self._background_entropy}

    # --- batches ------------------------------------------------------------------------

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        return self._sample(rng(seed, 101, step), batch_size)

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        # both splits score the same sequences; a draw with no recurrence position at all (a tiny
        # context, a low copy_rate) would leave 'copies' without a target: the next stream is used
        for attempt in range(8):
            batch = self._sample(rng(seed, 202, 0, *((attempt,) if attempt else ())), n)
            recur = batch.extra["recurrence"]
            if recur.any():
                break
        else:
            raise ValueError("recurring_segments: 8 eval draws in a row had no recurrence position; raise "
                             "copy_rate, seq_len or min_len, or lower noise")
        if split == "copies":
            batch.targets = torch.where(recur, batch.targets, IGNORE)
        batch.induction_targets = induction_targets_from_tokens(batch.tokens, recur)
        return batch

    def _logits(self, last: np.ndarray, before: np.ndarray) -> np.ndarray:
        out = self.last_logits.numpy()[last]
        return out + self.skip_logits.numpy()[before] if self.spec.skip_scale > 0 else out

    def _sample(self, g: torch.Generator, b: int, recurrences: bool = True) -> Batch:
        s = self.spec
        V, T = s.n_tokens, s.seq_len
        # every random number up front, so the walk is a pure function of the generator
        first = torch.randint(V, (b,), generator=g).numpy()
        u_background = torch.rand(b, T, generator=g, dtype=torch.float64).numpy()
        starts = (torch.rand(b, T, generator=g) < (s.copy_rate if recurrences else 0.0)).numpy()
        lo, hi = math.log(s.min_gap), math.log(s.longest_gap + 1)
        gaps = torch.exp(lo + (hi - lo) * torch.rand(b, T, generator=g, dtype=torch.float64)).floor().long()
        gaps = gaps.clamp(s.min_gap, s.longest_gap).numpy()
        lengths = torch.randint(s.min_len, s.max_len + 1, (b, T), generator=g).numpy()
        noisy = (torch.rand(b, T, generator=g) < s.noise).numpy()
        noise_tokens = torch.randint(V, (b, T), generator=g).numpy()

        rows = np.arange(b)
        tokens = np.empty((b, T), dtype=np.int64)
        source = np.full((b, T), -1, dtype=np.int64)  # faithful copies: the position copied
        run = np.full((b, T), -1, dtype=np.int64)  # id of the recurrence a copied token belongs to
        tokens[:, 0] = first
        ptr = np.zeros(b, dtype=np.int64)
        left = np.zeros(b, dtype=np.int64)
        for t in range(1, T):
            begin = (left == 0) & starts[:, t] & (gaps[:, t] <= t)
            ptr = np.where(begin, t - gaps[:, t], ptr + 1)
            left = np.where(begin, lengths[:, t], left)
            copying = left > 0
            logits = self._logits(tokens[:, t - 1], tokens[:, max(t - 2, 0)])
            p = np.exp(logits - logits.max(-1, keepdims=True))
            cdf = p.cumsum(-1)
            bg = np.minimum((cdf < u_background[:, t, None] * cdf[:, -1:]).sum(-1), V - 1)
            copied = np.where(noisy[:, t], noise_tokens[:, t], tokens[rows, np.minimum(ptr, t - 1)])
            tokens[:, t] = np.where(copying, copied, bg)
            faithful = copying & ~noisy[:, t]
            source[:, t] = np.where(faithful, ptr, -1)
            run[:, t] = np.where(copying, np.where(begin, t, run[:, t - 1]), -1)
            left = left - copying
        # q is a recurrence position if q and q+1 are faithful copies of the same recurrence
        recur = np.zeros((b, T), dtype=bool)
        recur[:, :-1] = (source[:, :-1] >= 0) & (source[:, 1:] >= 0) & (run[:, :-1] == run[:, 1:])
        tokens_t = torch.from_numpy(tokens)
        return Batch(inputs=(tokens_t,), targets=next_token_targets(tokens_t), tokens=tokens_t,
                     extra={"source": torch.from_numpy(source), "recurrence": torch.from_numpy(recur)})
