"""Repeated random tokens (Olsson et al. 2022): ``BOS t1..tL t1..tL …`` (R copies), next-token loss.

Rules:
- Tokens are ids ``0..n_tokens−1`` drawn uniformly with replacement; ``BOS`` is id ``n_tokens``,
  so the model's vocabulary is ``n_tokens + 1``. Nothing depends on a tokenizer.
- With ``seq_len_min`` set, each sequence draws its own ``L`` in ``[seq_len_min, seq_len]`` and
  the context after its R copies is filled with fresh random tokens that carry no loss. A fixed
  ``L`` lets a model copy by position alone (attend to ``q − L + 1``); a varying one forces a
  real induction head.
- The loss is next-token cross-entropy wherever the next token belongs to the copies
  (``loss_on: all``), or only where an induction head can predict it (``loss_on: repeats``:
  from the second token of copy 2 on; the first token of a copy follows the previous copy's
  last token, whose earlier occurrences say nothing about it).
- ``induction_targets[b, q, k]`` marks, for a query ``q`` in copy 2.., every key ``k`` that
  follows an earlier occurrence of the same segment position: ``k = q − m·L + 1``. Prefix
  matching on the task's own data is attention summed over those keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from optolab.core.errors import SpecError
import optolab.tasks.counter as counter
from optolab.tasks.base import IGNORE, Batch, ModelIO, Task, TaskSpec, rng, stacked, unstacked
from optolab.tasks.tokens import induction_targets


class RepeatTokensSpec(TaskSpec):
    kind: Literal["repeat_tokens"] = "repeat_tokens"
    n_tokens: int = Field(64, ge=2, description="ordinary token ids (BOS is one more)")
    seq_len: int = Field(10, ge=1, description="random tokens per copy (L; the maximum if seq_len_min is set)")
    seq_len_min: int | None = Field(None, ge=1, description="draw L per sequence from [seq_len_min, seq_len]")
    n_repeats: int = Field(3, ge=2, description="copies of the random segment (R)")
    loss_on: Literal["all", "repeats"] = "all"

    DATA_STREAMS: ClassVar[tuple[str, ...]] = ("torch", "counter")

    @model_validator(mode="after")
    def _lengths(self) -> RepeatTokensSpec:
        if self.seq_len_min is not None and self.seq_len_min > self.seq_len:
            raise SpecError("seq_len_min", f"seq_len_min ({self.seq_len_min}) exceeds seq_len ({self.seq_len}).",
                            "set seq_len_min <= seq_len.")
        shortest = self.seq_len_min or self.seq_len
        if self.loss_on == "repeats" and shortest * (self.n_repeats - 1) < 2:
            field = "seq_len_min" if self.seq_len_min is not None else "seq_len"
            raise SpecError(field, f"loss_on: repeats scores nothing in a sequence with L = {shortest} and "
                            f"n_repeats = {self.n_repeats} (the first repeated token is never scored).",
                            f"use {field} >= 2, n_repeats >= 3, or loss_on: all.")
        return self


class RepeatTokensTask(Task):
    """Repeated random tokens (Olsson et al. 2022): BOS t1..tL t1..tL …, next-token loss."""

    kind = "repeat_tokens"
    Spec = RepeatTokensSpec
    spec: RepeatTokensSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        @st.composite
        def draw_spec(draw: Any) -> RepeatTokensSpec:
            n_repeats = draw(st.integers(2, 4))
            loss_on = draw(st.sampled_from(["all", "repeats"]))
            shortest = 2 if loss_on == "repeats" and n_repeats == 2 else 1  # something must be scored
            seq_len = draw(st.integers(shortest, 12))
            variable = draw(st.booleans())
            return RepeatTokensSpec(n_tokens=draw(st.integers(2, 40)), seq_len=seq_len,
                                    seq_len_min=draw(st.integers(shortest, seq_len)) if variable else None,
                                    n_repeats=n_repeats, loss_on=loss_on,
                                    data_stream=draw(st.sampled_from(["torch", "counter"])))

        return draw_spec()

    @property
    def n_ctx(self) -> int:
        return 1 + self.spec.seq_len * self.spec.n_repeats

    @property
    def bos(self) -> int:
        return self.spec.n_tokens

    def model_io(self) -> ModelIO:
        return ModelIO(input_mode="tokens", n_ctx=self.n_ctx, d_out=self.spec.n_tokens + 1,
                       d_vocab=self.spec.n_tokens + 1)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("val",)

    def reference_losses(self) -> dict[str, float]:
        s = self.spec
        uniform = math.log(s.n_tokens)
        # a perfect in-context copier pays ln n_tokens only on the first of R copies (any L)
        # an induction head cannot predict the first copy, nor the first token of the second
        # (nothing in the context says a copy starts there): L + 1 of the R·L targets
        lengths = range(s.seq_len_min or s.seq_len, s.seq_len + 1)
        unpredictable = sum((L + 1) / (s.n_repeats * L) for L in lengths) / len(lengths)
        copying = uniform * unpredictable if s.loss_on == "all" else 0.0
        return {f"ln {s.n_tokens} (uniform)": uniform, "perfect copying": copying}

    @property
    def icl_splits(self) -> tuple[str, ...]:
        # with loss on every copy, the first copy cannot be read off the context
        return ("val",) if self.spec.loss_on == "repeats" else ()

    def token_probe_vocab(self) -> tuple[int, int | None]:
        return self.spec.n_tokens, self.bos

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        if self.spec.data_stream == "counter":
            return unstacked(self.train_batches([seed], step, batch_size), 0)
        return self._sample(rng(seed, 101, step), batch_size)

    def train_batches(self, seeds: Sequence[int], step: int, batch_size: int,
                      device: torch.device | str = "cpu") -> Batch:
        """The counter stream's training batches of every seed at ``step``, stacked ``[S, batch, …]``
        and drawn on ``device``; ``train_batch`` is this for one seed on the CPU."""
        s, b = self.spec, batch_size
        key = counter.keys(seeds, 101, step, device=device)  # [S]
        S = len(key)
        # one draw, in this order: the segment, its length, the filler
        w_seg, w_len, w_fill = counter.draws(key, [(b, s.seq_len), (b, 1), (b, self.n_ctx - 1)])
        segment = counter.below(w_seg, s.n_tokens)
        L = None
        if s.seq_len_min is not None:
            span = s.seq_len - s.seq_len_min + 1
            L = (s.seq_len_min + counter.below(w_len, span)).reshape(S * b, 1)
        filler = counter.below(w_fill, s.n_tokens)
        return stacked(self._assemble(segment.reshape(S * b, -1), L, filler.reshape(S * b, -1)), S)

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        return self._sample(rng(seed, 202, 0), n)

    def _sample(self, g: torch.Generator, b: int) -> Batch:
        s = self.spec
        segment = torch.randint(s.n_tokens, (b, s.seq_len), generator=g)
        L = None if s.seq_len_min is None else torch.randint(s.seq_len_min, s.seq_len + 1, (b, 1), generator=g)
        filler = torch.randint(s.n_tokens, (b, self.n_ctx - 1), generator=g)
        return self._assemble(segment, L, filler)

    def _assemble(self, segment: torch.Tensor, L: torch.Tensor | None, filler: torch.Tensor) -> Batch:
        """A batch from its draws (no randomness here): the segments ``[b, seq_len]``, their
        lengths ``[b, 1]`` (None: ``seq_len``) and the filler ``[b, n_ctx − 1]``."""
        s = self.spec
        b, dev = segment.shape[0], segment.device
        n = self.n_ctx - 1  # positions after BOS
        if L is None:
            L = torch.full((b, 1), s.seq_len, device=dev)
        pos = torch.arange(n, device=dev)[None, :]  # [1, n]
        in_copies = pos < L * s.n_repeats  # [b, n]
        body = torch.where(in_copies, segment.gather(1, (pos % L).expand(b, n)), filler)
        tokens = torch.cat([torch.full((b, 1), self.bos, device=dev), body], dim=1)
        # the target at position p is token p+1 = body[p]: keep it if body[p] is in the copies
        # "repeats": from the second token of copy 2 on (the first follows copy 1's last token,
        # whose earlier occurrences do not predict it)
        keep = in_copies & (pos > L) if s.loss_on == "repeats" else in_copies
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = torch.where(keep, body, IGNORE)
        return Batch(inputs=(tokens,), targets=targets, tokens=tokens,
                     induction_targets=induction_targets(L, s.n_repeats, n + 1, prefix=1))
