"""In-context classification of Gaussian-mixture items (Reddy 2023, arXiv 2312.03002).

Rules:
- ``K`` classes with means ``μ_k ~ N(0, I/D)`` fixed by ``task_seed``; every occurrence of an
  item is drawn fresh: ``x = (μ_k + ε η)/√(1+ε²)``, ``η ~ N(0, I/D)``. Each class has a fixed
  label (a balanced assignment, ``K/L`` classes per label, chosen by ``task_seed``), so the task
  can be solved in weights (memorise class → label) or in context (copy the label shown with an
  item of the query's class).
- A sequence is ``x1 l1 … xN lN q`` and the loss is taken at the query only. With probability
  ``bursty_frac`` a sequence is *bursty*: ``N/B`` distinct classes appear ``B`` times each and
  the query's class is one of them. Otherwise the ``N`` items and the query are drawn i.i.d.
  Classes are drawn with Zipf weights ``p_k ∝ k^-α`` (α = 0: uniform).
- With probability ``novel_frac`` a training sequence uses classes drawn fresh for that
  sequence (new means, random labels): only in-context learning helps on those. Fresh classes
  have negative ids in ``Batch.extra["classes"]`` (distinct within a sequence).
- Eval splits: ``ic`` (bursty sequences of ``n_test_classes`` held-out classes with random
  labels per sequence: in-context learning of novel classes), ``ic2`` (bursty, train classes,
  labels permuted per sequence: the in-context answer contradicts the memorised one), ``iw``
  (i.i.d. context without the query's class: only in-weights learning helps) and ``train``
  (the training distribution).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from optolab.core.errors import SpecError
from optolab.tasks.base import Batch, Holdout, TaskSpec, rng
from optolab.tasks.exemplars import ExemplarLabelTask, exemplar_label_batch
from optolab.tasks.tokens import iid_excluding, sample_distinct, sample_iid

SPLITS = ("ic", "ic2", "iw", "train")


class GaussianICLSpec(TaskSpec):
    kind: Literal["gaussian_icl"] = "gaussian_icl"
    n_classes: int = Field(512, ge=2, description="K: classes seen in training")
    n_labels: int = Field(32, ge=2, description="L: labels; class k has a fixed one")
    context_pairs: int = Field(8, ge=1, description="N: item-label pairs before the query")
    dim: int = Field(63, ge=1, description="D: item dimension")
    noise: float = Field(0.1, ge=0, description="ε: within-class noise")
    burstiness: int = Field(4, ge=1, description="B: occurrences of each class in a bursty sequence")
    bursty_frac: float = Field(1.0, ge=0, le=1, description="p_B: fraction of bursty training sequences")
    zipf: float = Field(0.0, ge=0, description="α: class weights ∝ rank^-α")
    novel_frac: float = Field(0.0, ge=0, le=1, description="fraction of training sequences of fresh classes")
    n_test_classes: int = Field(1000, ge=1, description="held-out classes for the ic split")
    distinct_labels: bool = Field(False, description="fresh and held-out classes of a sequence get distinct labels "
                                  "(Reddy's no_repeats)")

    def static_bytes(self) -> int:
        return 4 * (self.n_classes + self.n_test_classes) * self.dim

    @model_validator(mode="after")
    def _consistent(self) -> GaussianICLSpec:
        N, B, K, L = self.context_pairs, self.burstiness, self.n_classes, self.n_labels
        if N % B:
            raise SpecError("burstiness", f"context_pairs ({N}) must be a multiple of burstiness ({B}), so each "
                            "of N/B classes appears B times.",
                            f"use burstiness in {[d for d in range(1, N + 1) if N % d == 0]}.")
        if L > K:
            raise SpecError("n_labels", f"n_labels ({L}) exceeds n_classes ({K}): some labels would have no class.",
                            "use n_labels <= n_classes.")
        if K % L:
            raise SpecError("n_classes", f"n_classes ({K}) must be a multiple of n_labels ({L}) for a balanced "
                            "class→label map.", f"use n_classes = {max(L, K // L * L)} or {(K // L + 1) * L}.")
        if N // B > K:
            raise SpecError("n_classes", f"a bursty sequence needs N/B = {N // B} distinct classes but n_classes "
                            f"is {K}.", "raise n_classes or burstiness.")
        if self.distinct_labels and N // B > L:
            raise SpecError("distinct_labels", f"distinct labels for N/B = {N // B} classes need that many labels "
                            f"but n_labels is {L}.", "raise n_labels or burstiness, or set distinct_labels: false.")
        if N // B > self.n_test_classes:
            raise SpecError("n_test_classes", f"the ic split needs N/B = {N // B} distinct held-out classes.",
                            f"set n_test_classes >= {N // B}.")
        return self


class GaussianICLTask(ExemplarLabelTask):
    """Gaussian-mixture in-context classification (Reddy 2023): x1 l1 … xN lN q, loss at q."""

    kind = "gaussian_icl"
    Spec = GaussianICLSpec
    spec: GaussianICLSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        task_seeds = st.integers(0, 2**31 - 1)

        @st.composite
        def draw_spec(draw: Any) -> GaussianICLSpec:
            n_labels = draw(st.integers(2, 8))
            n_classes = n_labels * draw(st.integers(1, 6))
            context_pairs = draw(st.integers(1, 8))
            divisors = [d for d in range(1, context_pairs + 1) if context_pairs % d == 0 and context_pairs // d <= n_classes]
            burstiness = draw(st.sampled_from(divisors))
            return GaussianICLSpec(
                n_classes=n_classes, n_labels=n_labels, context_pairs=context_pairs, dim=draw(st.integers(1, 16)),
                noise=draw(st.floats(0, 2)), burstiness=burstiness, bursty_frac=draw(st.floats(0, 1)),
                zipf=draw(st.floats(0, 2)), novel_frac=draw(st.floats(0, 1)),
                n_test_classes=draw(st.integers(context_pairs // burstiness, 20)), task_seed=draw(task_seeds))

        return draw_spec()

    def __init__(self, spec: GaussianICLSpec) -> None:
        super().__init__(spec)
        s = spec
        g = rng(s.task_seed, 0)
        D = s.dim
        self.means = torch.randn(s.n_classes + s.n_test_classes, D, generator=g) / math.sqrt(D)
        # balanced fixed labels: K/L classes per label, in a random order
        self.class_labels = (torch.arange(s.n_classes) % s.n_labels)[torch.randperm(s.n_classes, generator=g)]
        w = (torch.arange(1, s.n_classes + 1, dtype=torch.float64) ** -s.zipf)
        self.class_probs = (w / w.sum()).float()

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return SPLITS

    @property
    def icl_splits(self) -> tuple[str, ...]:
        return ("ic", "ic2")

    def holdouts(self) -> tuple[Holdout, ...]:
        s = self.spec
        test = frozenset(range(s.n_classes, s.n_classes + s.n_test_classes))
        return (Holdout("classes", test, splits=("ic",), what="held-out classes"),)

    def reference_losses(self) -> dict[str, float]:
        s = self.spec
        k = s.context_pairs // s.burstiness
        return {f"ln {k} (chance among context classes)": math.log(k),
                f"ln {s.n_labels} (chance over labels)": math.log(s.n_labels)}

    def label_ids(self) -> torch.Tensor:
        return torch.arange(self.spec.n_labels)

    # --- batches ------------------------------------------------------------------------

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        return self._sample(rng(seed, 101, step), batch_size, "train")

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        return self._sample(rng(seed, 202, SPLITS.index(split)), n, split)

    def _bursty_classes(self, g: torch.Generator, b: int, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context classes [b, N], query class [b])``: N/B distinct classes, B times each."""
        s = self.spec
        k = s.context_pairs // s.burstiness
        distinct = sample_distinct(probs, b, k, g)  # [b, k]
        slots = torch.arange(k).repeat_interleave(s.burstiness)  # [N]
        order = torch.rand(b, s.context_pairs, generator=g).argsort(dim=1)
        ctx = distinct.gather(1, slots[order])
        query = distinct.gather(1, torch.randint(k, (b, 1), generator=g)).squeeze(1)
        return ctx, query

    def _iid_classes(self, g: torch.Generator, b: int, exclude_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
        query = sample_iid(self.class_probs, (b,), g)
        ctx = sample_iid(self.class_probs, (b, self.spec.context_pairs), g)
        return (iid_excluding(self.class_probs, ctx, query, g) if exclude_query else ctx), query

    def _fresh_slots(self, g: torch.Generator, b: int, bursty: torch.Tensor) -> torch.Tensor:
        """``[b, N+1]`` slot ids of fresh-class sequences (equal ids = the same fresh class)."""
        s = self.spec
        N, k = s.context_pairs, s.context_pairs // s.burstiness
        order = torch.rand(b, N, generator=g).argsort(dim=1)
        bursty_ctx = torch.arange(k).repeat_interleave(s.burstiness)[order]  # [b, N]
        bursty_slots = torch.cat([bursty_ctx, torch.randint(k, (b, 1), generator=g)], dim=1)
        return torch.where(bursty[:, None], bursty_slots, torch.arange(N + 1).expand(b, -1))

    def _fresh_labels(self, g: torch.Generator, b: int, n: int) -> torch.Tensor:
        """Labels ``[b, n]`` for up to ``n`` fresh classes per sequence (indexed by slot)."""
        L = self.spec.n_labels
        if self.spec.distinct_labels and n <= L:
            return torch.rand(b, L, generator=g).argsort(dim=1)[:, :n]
        if self.spec.distinct_labels:  # more classes than labels (i.i.d. sequences): labels must repeat
            perm = torch.rand(b, L, generator=g).argsort(dim=1)
            return perm[:, torch.arange(n) % L]
        return torch.randint(L, (b, n), generator=g)

    def _sample(self, g: torch.Generator, b: int, split: str) -> Batch:
        s = self.spec
        N, K, L = s.context_pairs, s.n_classes, s.n_labels
        novel = torch.zeros(b, dtype=torch.bool)
        if split == "ic":
            test_probs = torch.ones(s.n_test_classes) / s.n_test_classes
            ctx, query = self._bursty_classes(g, b, test_probs)
            ctx, query = ctx + K, query + K
        elif split == "ic2":
            ctx, query = self._bursty_classes(g, b, self.class_probs)
        elif split == "iw":
            ctx, query = self._iid_classes(g, b, exclude_query=True)
        else:  # training distribution
            bursty = torch.rand(b, generator=g) < s.bursty_frac
            if s.novel_frac > 0:
                novel = torch.rand(b, generator=g) < s.novel_frac
            ctx = torch.zeros(b, N, dtype=torch.long)
            query = torch.zeros(b, dtype=torch.long)
            if not novel.all():  # draw train classes only when some sequence uses them
                b_ctx, b_query = self._bursty_classes(g, b, self.class_probs)
                i_ctx, i_query = self._iid_classes(g, b, exclude_query=False)
                ctx = torch.where(bursty[:, None], b_ctx, i_ctx)
                query = torch.where(bursty, b_query, i_query)
        classes = torch.cat([ctx, query[:, None]], dim=1)  # [b, N+1]

        all_fresh = split == "train" and bool(novel.all())
        if not all_fresh:
            means = self.means[classes.clamp(0, K + s.n_test_classes - 1)]  # [b, N+1, D]
            labels = self.class_labels[classes.clamp(0, K - 1)]  # fixed labels (train classes)
        if split == "ic":  # novel classes: a random label per class per sequence
            labels = self._fresh_labels(g, b, N + 1).gather(1, _slots_per_row(classes))
        elif split == "ic2":  # permute the label set per sequence
            perm = torch.rand(b, L, generator=g).argsort(dim=1)
            labels = perm.gather(1, labels)
        elif split == "train" and novel.any():
            # fresh classes: slot ids per sequence (bursty: N/B slots B times each, the query one
            # of them; i.i.d.: all distinct), each slot a new mean and label
            slot = self._fresh_slots(g, b, bursty)
            fresh_means = torch.randn(b, N + 1, s.dim, generator=g) / math.sqrt(s.dim)
            fresh_labels = self._fresh_labels(g, b, N + 1)
            fresh_means = fresh_means.gather(1, slot[..., None].expand(-1, -1, s.dim))
            if all_fresh:  # the common "only in-context learning helps" setting: no mixing
                means, labels, classes = fresh_means, fresh_labels.gather(1, slot), -1 - slot
            else:
                means = torch.where(novel[:, None, None], fresh_means, means)
                labels = torch.where(novel[:, None], fresh_labels.gather(1, slot), labels)
                classes = torch.where(novel[:, None], -1 - slot, classes)

        eta = torch.randn(b, N + 1, s.dim, generator=g) / math.sqrt(s.dim)
        x = (means + s.noise * eta) / math.sqrt(1 + s.noise**2)
        ctx_labels, target = labels[:, :N], labels[:, N]
        return exemplar_label_batch(x, ctx_labels, target, classes, L)


def _slots_per_row(classes: torch.Tensor) -> torch.Tensor:
    """For each row, the index of each entry's first occurrence: equal classes share a slot."""
    same = classes[:, :, None] == classes[:, None, :]  # [b, n, n]
    return same.float().argmax(dim=2)  # first True along the row
