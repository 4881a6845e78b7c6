"""Trigger → output sequences on a bigram background (Bietti et al. 2023, "Birth of a transformer").

Rules:
- A synthetic background replaces the authors' tiny-Shakespeare characters: a fixed bigram
  table over ``n_tokens`` ids with Dirichlet(``background_concentration``) rows, drawn from
  ``task_seed``, and the first token from its stationary distribution. Rows are stored as
  ``resolution`` equal-probability slots (probabilities are multiples of 1/resolution), which
  *is* the background distribution and makes sampling one gather per position.
- ``n_triggers`` trigger tokens: the most frequent tokens of the background (``fixed_triggers``,
  the authors' ``fixed_special_toks``) or drawn per sequence from the unigram distribution
  without replacement. Each sequence draws an output token per trigger, uniformly from the
  vocabulary; whenever a trigger occurs, the next token is its output.
- Training loss: next-token loss everywhere (``loss_on: all``) or only on outputs after a
  trigger's second and later occurrences (``loss_on: outputs``, the authors' loss_head_only).
- Eval splits: ``induction`` (loss only on those second-and-later outputs: solvable only by an
  induction head) and ``val`` (the training loss). ``induction`` carries ``induction_targets``.
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
from optolab.tasks.markov_icl import stationary
from optolab.tasks.tokens import NextTokenTask, gamma, induction_targets_from_tokens, inverse_cdf, next_token_targets

SPLITS = ("induction", "val")


class TriggerBigramSpec(TaskSpec):
    kind: Literal["trigger_bigram"] = "trigger_bigram"
    n_tokens: int = Field(64, ge=3, description="vocabulary size")
    seq_len: int = Field(256, ge=4, description="tokens per sequence (the model's context)")
    n_triggers: int = Field(5, ge=1, description="k: trigger tokens")
    fixed_triggers: bool = Field(True, description="the k most frequent tokens; false: drawn per sequence")
    background_concentration: float = Field(0.1, gt=0, description="Dirichlet α of the bigram rows (small: peaked)")
    resolution: int = Field(1024, ge=16, description="background probabilities are multiples of 1/resolution")
    loss_on: Literal["all", "outputs"] = "all"

    def static_bytes(self) -> int:
        return 8 * self.n_tokens * (self.n_tokens + self.resolution)  # bigram table and its sampler

    @model_validator(mode="after")
    def _consistent(self) -> TriggerBigramSpec:
        if self.n_triggers >= self.n_tokens:
            raise SpecError("n_triggers", f"n_triggers ({self.n_triggers}) must be below n_tokens "
                            f"({self.n_tokens}) so some tokens are ordinary.", "lower n_triggers or raise n_tokens.")
        return self


class TriggerBigramTask(NextTokenTask):
    """Trigger→output pairs on a bigram background (Bietti et al. 2023): next-token loss."""

    kind = "trigger_bigram"
    Spec = TriggerBigramSpec
    spec: TriggerBigramSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        task_seeds = st.integers(0, 2**31 - 1)

        @st.composite
        def draw_spec(draw: Any) -> TriggerBigramSpec:
            n_tokens = draw(st.integers(3, 24))
            return TriggerBigramSpec(n_tokens=n_tokens, seq_len=draw(st.integers(32, 64)),
                                     n_triggers=draw(st.integers(1, min(4, n_tokens - 1))),
                                     fixed_triggers=draw(st.booleans()),
                                     background_concentration=draw(st.sampled_from([0.05, 0.3, 1.0])),
                                     resolution=draw(st.sampled_from([64, 256, 1024])),
                                     loss_on=draw(st.sampled_from(["all", "outputs"])), task_seed=draw(task_seeds))

        return draw_spec()

    def __init__(self, spec: TriggerBigramSpec) -> None:
        super().__init__(spec)
        s = spec
        g = rng(s.task_seed, 0)
        V = s.n_tokens
        rows = _dirichlet_rows(V, s.background_concentration, g)
        # quantise each row to `resolution` slots (largest remainder), so sampling is exact
        slots = torch.floor(rows * s.resolution)
        short = s.resolution - slots.sum(-1)
        rem = rows * s.resolution - slots
        top = rem.argsort(dim=-1, descending=True).argsort(dim=-1) < short[:, None]
        counts = (slots + top.float()).long()  # [V, V], rows sum to resolution
        self.bigram = counts.float() / s.resolution
        self.slot_table = torch.repeat_interleave(torch.arange(V).repeat(V), counts.flatten()).view(V, s.resolution)
        self.unigram = stationary(self.bigram[None], V, 1).squeeze(0)
        self.frequent = self.unigram.argsort(descending=True)[: s.n_triggers]

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return SPLITS

    @property
    def icl_splits(self) -> tuple[str, ...]:
        return ("induction",)

    def reference_losses(self) -> dict[str, float]:
        s = self.spec
        p = self.bigram.clamp_min(1e-12)
        bigram_entropy = float(-(self.unigram[:, None] * self.bigram * p.log()).sum())
        return {f"ln {s.n_tokens} (uniform)": math.log(s.n_tokens),
                "background bigram entropy": bigram_entropy}

    @cached_property
    def _unigram_cdf(self) -> torch.Tensor:
        return self.unigram.cumsum(0)

    # --- batches ------------------------------------------------------------------------

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        if self.spec.loss_on == "all":
            return self._sample(rng(seed, 101, step), batch_size)
        return self._with_outputs(lambda attempt: rng(seed, 101, step, *attempt), batch_size)

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        if split != "induction" and self.spec.loss_on == "all":
            return self._sample(rng(seed, 202, SPLITS.index(split)), n)
        batch = self._with_outputs(lambda attempt: rng(seed, 202, SPLITS.index(split), *attempt), n)
        if split == "induction":
            batch.induction_targets = induction_targets_from_tokens(batch.tokens, batch.targets != IGNORE)
        return batch

    def _with_outputs(self, gen, n: int, attempts: int = 8) -> Batch:
        """A batch whose loss is on repeated triggers' outputs only. A background chain that
        rarely reaches a trigger (a tiny vocabulary, a low concentration) can give a batch with
        no such position at all, whose loss would be NaN: such a batch is drawn again from the
        next stream (``gen((attempt,))``; the first draw keeps the plain stream, so batches that
        have an output are what they always were)."""
        for attempt in range(attempts):
            batch = self._sample(gen(() if attempt == 0 else (attempt,)), n)
            keep = self._second_outputs(batch)
            if keep.any():
                batch.targets = torch.where(keep, batch.targets, IGNORE)
                return batch
        raise ValueError(f"trigger_bigram: {attempts} batches in a row had no repeated trigger; this background "
                         "chain (n_tokens, background_concentration) rarely reaches its triggers: use "
                         "loss_on: all, more tokens or a higher concentration")

    def _second_outputs(self, batch: Batch) -> torch.Tensor:
        """``[b, T]``: position t holds a trigger seen before t, so its next token is an output
        that already appeared in context."""
        tokens, trig = batch.tokens, batch.extra["triggers"]
        is_trig = (tokens[:, :, None] == trig[:, None, :]).any(-1)  # [b, T]
        earlier = (tokens[:, :, None] == tokens[:, None, :]).tril(-1).any(-1)  # token seen before t
        keep = is_trig & earlier
        keep[:, -1] = False
        return keep

    def _sample(self, g: torch.Generator, b: int) -> Batch:
        s = self.spec
        V, T, k = s.n_tokens, s.seq_len, s.n_triggers
        if s.fixed_triggers:
            trig = self.frequent.expand(b, k)
        else:
            trig = torch.multinomial(self.unigram.expand(b, -1), k, replacement=False, generator=g)
        outputs = torch.randint(V, (b, k), generator=g)
        pick = torch.randint(s.resolution, (b, T - 1), generator=g)  # background slot per position
        output_of = torch.full((b, V), -1, dtype=torch.long).scatter_(1, trig, outputs)  # -1: not a trigger
        first = inverse_cdf(self._unigram_cdf, torch.rand(b, generator=g))
        tokens = _walk(first, pick, self.slot_table, output_of)  # [b, T]
        return Batch(inputs=(tokens,), targets=next_token_targets(tokens), tokens=tokens,
                     extra={"triggers": trig, "outputs": outputs})


def _dirichlet_rows(n: int, alpha: float, g: torch.Generator) -> torch.Tensor:
    rows = gamma(torch.full((n, n), float(alpha)), g).double()
    rows = rows.clamp_min(1e-30)
    return rows / rows.sum(-1, keepdim=True)


def _walk(first: torch.Tensor, pick: torch.Tensor, slot_table: torch.Tensor, output_of: torch.Tensor) -> torch.Tensor:
    """``x_{t+1}`` = the trigger's output if ``x_t`` is a trigger of that sequence, else background
    slot ``pick[t]`` of row ``x_t``. Sequential by nature; numpy keeps each step to three ops."""
    slots, outs, picks = slot_table.numpy(), output_of.numpy(), pick.numpy()
    b, steps = picks.shape
    rows = np.arange(b)
    tokens = np.empty((b, steps + 1), dtype=np.int64)
    x = tokens[:, 0] = first.numpy()
    for t in range(steps):
        out = outs[rows, x]
        x = tokens[:, t + 1] = np.where(out >= 0, out, slots[x, picks[:, t]])
    return torch.from_numpy(tokens)
