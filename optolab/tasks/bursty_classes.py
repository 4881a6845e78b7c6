"""Bursty few-shot sequences with fixed class labels (Chan et al. 2022, arXiv 2205.05055).

Rules (following deepmind/emergent_in_context_learning):
- ``n_classes`` training classes with Zipf weights ``∝ rank^-α`` and a *fixed* label each
  (class k → label k mod ``n_labels``; ``n_labels = n_classes`` by default, as in the paper), plus
  ``n_holdout_classes`` never seen in training. Items are exemplars of a synthetic bank
  (:mod:`optolab.tasks.exemplars`), any of ``n_exemplars`` per class.
- A sequence is ``x1 l1 … xN lN q``, loss at the query only. With probability ``bursty_frac``
  it is bursty: ``bursty_classes`` classes × ``shots`` items, the rest of the context Zipf
  draws, shuffled, and the query from one of the bursty classes. Otherwise every item and the
  query are i.i.d. Zipf draws.
- Eval splits: ``fewshot_holdout`` (held-out classes, ``bursty_classes`` classes filling the
  whole context, labels re-drawn per sequence from ``0..bursty_classes−1``: in-context learning),
  ``no_support`` (the query's class never in the context, fixed labels: in-weights learning)
  and ``train`` (the training distribution).
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from optolab.core.errors import SpecError
from optolab.tasks.base import Batch, rng
from optolab.tasks.exemplars import HeldOutClassesSpec, HeldOutClassesTask, exemplar_label_batch
from optolab.tasks.tokens import iid_excluding, sample_distinct, sample_iid

SPLITS = ("fewshot_holdout", "no_support", "train")


class BurstyClassesSpec(HeldOutClassesSpec):
    kind: Literal["bursty_classes"] = "bursty_classes"
    n_holdout_classes: int = Field(10, ge=2, description="classes only the fewshot_holdout split uses")
    bursty_frac: float = Field(0.9, ge=0, le=1, description="p_bursty")
    bursty_classes: int = Field(2, ge=1, description="classes in a bursty block (ways)")
    shots: int = Field(3, ge=1, description="items per bursty class in training")
    zipf: float = Field(0.0, ge=0, description="α: class weights ∝ rank^-α")

    @model_validator(mode="after")
    def _consistent(self) -> BurstyClassesSpec:
        N, ways = self.context_pairs, self.bursty_classes
        if ways * self.shots > N:
            raise SpecError("shots", f"a bursty block of bursty_classes × shots = {ways} × {self.shots} does not "
                            f"fit in context_pairs ({N}).", "lower shots or raise context_pairs.")
        if N % ways:
            raise SpecError("context_pairs", f"the fewshot_holdout split fills the context with {ways} classes, so "
                            f"context_pairs ({N}) must be a multiple of bursty_classes ({ways}).",
                            f"use context_pairs = {(N // ways + 1) * ways}.")
        if ways > min(self.n_holdout_classes, self.n_classes, self.n_labels):
            raise SpecError("bursty_classes", f"bursty_classes ({ways}) exceeds the classes or labels available.",
                            "use n_holdout_classes, n_classes and n_labels >= bursty_classes.")
        return self


class BurstyClassesTask(HeldOutClassesTask):
    """Bursty few-shot sequences with fixed labels (Chan et al. 2022): x1 l1 … xN lN q."""

    kind = "bursty_classes"
    Spec = BurstyClassesSpec
    spec: BurstyClassesSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        task_seeds = st.integers(0, 2**31 - 1)

        @st.composite
        def draw_spec(draw: Any) -> BurstyClassesSpec:
            ways = draw(st.integers(1, 3))
            context_pairs = ways * draw(st.integers(2 if ways == 1 else 1, 4))
            shots = draw(st.integers(1, context_pairs // ways))
            n_labels = draw(st.integers(max(2, ways), 10))
            return BurstyClassesSpec(
                n_classes=n_labels * draw(st.integers(1, 4)), n_labels=n_labels,
                n_holdout_classes=draw(st.integers(max(2, ways), 8)), n_exemplars=draw(st.integers(1, 4)),
                dim=draw(st.integers(1, 16)), design=draw(st.sampled_from(["relu_lowrank", "lowrank", "relu", "isotropic"])),
                latent_dim=draw(st.integers(1, 6)), noise=draw(st.floats(0, 1)), context_pairs=context_pairs,
                bursty_frac=draw(st.floats(0, 1)), bursty_classes=ways, shots=shots, zipf=draw(st.floats(0, 2)),
                task_seed=draw(task_seeds))

        return draw_spec()
    HOLDOUT_SPLITS = ("fewshot_holdout",)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return SPLITS

    @property
    def icl_splits(self) -> tuple[str, ...]:
        return ("fewshot_holdout",)

    def reference_losses(self) -> dict[str, float]:
        return {f"ln {self.spec.bursty_classes} (chance among context labels)": math.log(self.spec.bursty_classes)}

    @cached_property
    def class_probs(self) -> torch.Tensor:
        w = torch.arange(1, self.spec.n_classes + 1, dtype=torch.float64) ** -self.spec.zipf
        return (w / w.sum()).float()

    # --- batches ------------------------------------------------------------------------

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        return self._sample(rng(seed, 101, step), batch_size, "train")

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        return self._sample(rng(seed, 202, SPLITS.index(split)), n, split)

    def _block(self, g: torch.Generator, b: int, probs: torch.Tensor, shots: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ways`` distinct classes × ``shots`` each ``[b, ways·shots]``, the query's slot among
        the ways ``[b]``, and the distinct classes ``[b, ways]``."""
        ways = self.spec.bursty_classes
        distinct = sample_distinct(probs, b, ways, g)
        slot = torch.randint(ways, (b,), generator=g)
        return distinct.repeat_interleave(shots, dim=1), slot, distinct

    def _sample(self, g: torch.Generator, b: int, split: str) -> Batch:
        s = self.spec
        N, ways = s.context_pairs, s.bursty_classes
        probs = self.class_probs
        if split == "fewshot_holdout":
            uniform = torch.ones(s.n_holdout_classes) / s.n_holdout_classes
            ctx, slot, distinct = self._block(g, b, uniform, N // ways)
            ctx, query = ctx + s.n_classes, distinct.gather(1, slot[:, None]).squeeze(1) + s.n_classes
            # labels 0..ways-1 re-drawn per sequence: way j gets way_label[j]
            way_label = torch.rand(b, ways, generator=g).argsort(dim=1)
            labels = torch.cat([way_label.repeat_interleave(N // ways, dim=1),
                                way_label.gather(1, slot[:, None])], dim=1)
        elif split == "no_support":
            query = sample_iid(probs, (b,), g)
            ctx = iid_excluding(probs, sample_iid(probs, (b, N), g), query, g)
        else:
            block, slot, distinct = self._block(g, b, self.class_probs, s.shots)
            fill = sample_iid(probs, (b, N - block.shape[1]), g)
            iid = sample_iid(probs, (b, N + 1), g)
            bursty = torch.rand(b, generator=g) < s.bursty_frac
            ctx = torch.where(bursty[:, None], torch.cat([block, fill], dim=1), iid[:, :N])
            query = torch.where(bursty, distinct.gather(1, slot[:, None]).squeeze(1), iid[:, N])
        classes = torch.cat([ctx, query[:, None]], dim=1)  # [b, N+1]
        if split != "fewshot_holdout":
            labels = classes % s.n_labels  # fixed per class
        order = torch.cat([torch.rand(b, N, generator=g).argsort(dim=1),
                           torch.full((b, 1), N)], dim=1)  # shuffle the context, keep the query last
        classes, labels = classes.gather(1, order), labels.gather(1, order)
        ex = torch.randint(s.n_exemplars, (b, N + 1), generator=g)
        x = self.exemplars[classes, ex]
        batch = exemplar_label_batch(x, labels[:, :N], labels[:, N], classes, s.n_labels)
        batch.extra["exemplar_ids"] = ex
        return batch
