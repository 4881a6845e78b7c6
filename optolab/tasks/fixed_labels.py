"""Bursty pairs with fixed class labels and the coopetition evaluators (Singh et al. 2023, 2025).

Rules (arXiv 2311.08360 and 2503.05631; ANCHORS §8):
- ``n_classes`` training classes, each with a *fixed* label (class k → label k mod ``n_labels``;
  ``n_labels = n_classes`` by default), plus ``n_holdout_classes`` never seen in training. Items
  are exemplars of a synthetic bank (:mod:`optolab.tasks.exemplars`), ``n_exemplars`` per class.
- A training sequence is ``x1 l1 … xN lN q`` (N = ``context_pairs``, 2 in the papers), loss at
  the query only. The query's class is in the context (bursty); the other N−1 items are of
  distinct other classes; classes are uniform; the order of the context is shuffled. Both in-context
  learning (copy the label of the matching item) and in-weights learning (the class's label)
  solve it, which is what lets the two strategies compete.
- The query is an exemplar drawn independently of the context's item of its class, so it may
  be the same exemplar (1 in ``n_exemplars``). With ``match_query: true`` ("MQ" data) the query
  is always the very exemplar shown in the context, so exact-match copying suffices.
- Eval splits (the evaluators of the 2025 paper). In every split but ``icl_mq`` and ``train``
  the query is an exemplar *other* than the one its class shows in the context:

  ========== ==================================================== ===========================
  split      context                                              target
  ========== ==================================================== ===========================
  icl        held-out classes, labels drawn fresh per sequence    the query class's context label
  icl_mq     as ``icl``, the query is the context's exemplar      the query class's context label
  flip_icl   training classes, the query's item and another       the label the context gives the
             swap their fixed labels                              query's class (not its own)
  iwl        training classes, none of them the query's, fixed    the query's fixed label (absent
             labels                                               from the context)
  ciwl       training classes, none of them the query's; one      the query's fixed label (present
             item carries the query's label                       but on the wrong item)
  train      the training distribution                            the query's fixed label
  ========== ==================================================== ===========================

  ICL solves ``icl`` and ``flip_icl``; pure in-weights learning (IWL) solves ``iwl``, ``ciwl``
  and ``train`` and scores 0 on ``flip_icl``; context-constrained in-weights learning (CIWL:
  the answer is one of the context's labels, chosen by weights) solves ``ciwl`` and ``train``
  but not ``iwl`` or ``flip_icl``.
- Labels a split needs to be distinct from the target are drawn apart from it, so with
  ``n_labels < n_classes`` no split is accidentally solvable another way.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from optolab.core.errors import SpecError
from optolab.tasks.base import Batch, rng
from optolab.tasks.exemplars import HeldOutClassesSpec, HeldOutClassesTask, exemplar_label_batch

SPLITS = ("icl", "flip_icl", "iwl", "ciwl", "icl_mq", "train")


class FixedLabelsSpec(HeldOutClassesSpec):
    kind: Literal["fixed_labels"] = "fixed_labels"
    n_classes: int = Field(12800, ge=3, description="training classes, each with a fixed label")
    n_labels: int | None = Field(None, ge=3, description="default: n_classes (one label per class)")
    n_holdout_classes: int = Field(100, ge=2, description="classes only the icl splits use")
    n_exemplars: int = Field(20, ge=2, description="fixed exemplars per class")
    context_pairs: int = Field(2, ge=2, description="N: exemplar-label pairs before the query")
    match_query: bool = Field(False, description="MQ data: the query is the context's exemplar of its class")

    @model_validator(mode="after")
    def _consistent(self) -> FixedLabelsSpec:
        N = self.context_pairs
        if N + 1 > self.n_labels:
            raise SpecError("context_pairs", f"the iwl split needs {N + 1} distinct labels (context_pairs + 1) but "
                            f"n_labels is {self.n_labels}.", "raise n_labels or lower context_pairs.")
        if N > self.n_holdout_classes:
            raise SpecError("n_holdout_classes", f"the icl split shows {N} distinct held-out classes but "
                            f"n_holdout_classes is {self.n_holdout_classes}.", f"use n_holdout_classes >= {N}.")
        return self


def _others(n: int, avoid: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """``[b, k]`` distinct ids in ``[0, n)`` per row, none equal to the row's ``avoid`` (uniform).

    By rejection (rows with a clash are redrawn whole), because a training step must not pay for
    ``n`` random numbers per row when ``n`` is 12,800; a top-k over ``n`` scores when ``k`` is
    not small against ``n``."""
    b = avoid.shape[0]
    if 4 * (k + 1) > n:
        scores = torch.rand(b, n, generator=g)
        has = avoid >= 0
        scores[has.nonzero().squeeze(1), avoid[has]] = -1.0  # never among the top k
        return scores.topk(k, dim=1).indices
    out = torch.randint(n, (b, k), generator=g)
    for _ in range(10_000):
        both = torch.cat([avoid[:, None], out], dim=1).sort(dim=1).values
        bad = (both[:, 1:] == both[:, :-1]).any(dim=1)
        if not bad.any():
            return out
        out[bad] = torch.randint(n, (int(bad.sum()), k), generator=g)
    raise RuntimeError("could not draw distinct ids")


def _other_exemplar(ex: torch.Tensor, n_ex: int, g: torch.Generator) -> torch.Tensor:
    return (ex + 1 + torch.randint(n_ex - 1, ex.shape, generator=g)) % n_ex


class FixedLabelsTask(HeldOutClassesTask):
    """Bursty exemplar–label pairs with fixed class labels (Singh et al. 2025): x1 l1 … xN lN q."""

    kind = "fixed_labels"
    Spec = FixedLabelsSpec
    spec: FixedLabelsSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        task_seeds = st.integers(0, 2**31 - 1)

        @st.composite
        def draw_spec(draw: Any) -> FixedLabelsSpec:
            context_pairs = draw(st.integers(2, 4))
            n_labels = draw(st.integers(context_pairs + 1, 12))
            return FixedLabelsSpec(
                n_classes=n_labels * draw(st.integers(1, 4)), n_labels=n_labels,
                n_holdout_classes=draw(st.integers(context_pairs, 8)), n_exemplars=draw(st.integers(2, 5)),
                dim=draw(st.integers(1, 16)), design=draw(st.sampled_from(["relu_lowrank", "lowrank", "relu", "isotropic"])),
                latent_dim=draw(st.integers(1, 6)), noise=draw(st.floats(0, 1)), context_pairs=context_pairs,
                match_query=draw(st.booleans()), task_seed=draw(task_seeds))

        return draw_spec()
    HOLDOUT_SPLITS = ("icl", "icl_mq")

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return SPLITS

    @property
    def icl_splits(self) -> tuple[str, ...]:
        return ("icl", "flip_icl", "icl_mq")

    def reference_losses(self) -> dict[str, float]:
        return {f"ln {self.spec.context_pairs} (chance among context labels)": math.log(self.spec.context_pairs)}

    def fixed_label(self, classes: torch.Tensor) -> torch.Tensor:
        return classes % self.spec.n_labels

    # --- batches ------------------------------------------------------------------------

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        return self._sample(rng(seed, 101, step), batch_size, "train")

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        return self._sample(rng(seed, 202, SPLITS.index(split)), n, split)

    def _sample(self, g: torch.Generator, b: int, split: str) -> Batch:
        s = self.spec
        N, L, n_ex = s.context_pairs, s.n_labels, s.n_exemplars
        if split in ("icl", "icl_mq"):
            pool = s.n_holdout_classes
            none = torch.full((b,), -1)
            ctx = _others(pool, none, N, g) + s.n_classes
            labels = _others(L, none, N, g)  # fresh, distinct per sequence
            query = ctx[:, 0]  # slot 0 holds the query's class until the shuffle below
            target = labels[:, 0]
        else:
            query = torch.randint(s.n_classes, (b,), generator=g)
            target = self.fixed_label(query)
            if split in ("iwl", "ciwl"):
                # context classes whose labels differ from the query's (and from each other in iwl)
                lab = _others(L, target, N, g)
                ctx = lab + L * torch.randint(s.n_classes // L, (b, N), generator=g)
                labels = self.fixed_label(ctx)
                if split == "ciwl":
                    labels[:, 0] = target  # the query's label, on an item of another class
            else:
                ctx = torch.cat([query[:, None], _others_classes(self, query, N - 1, g)], dim=1)
                labels = self.fixed_label(ctx)
                if split == "flip_icl":
                    labels[:, [0, 1]] = labels[:, [1, 0]]
                    target = labels[:, 0]
        ex = torch.randint(n_ex, (b, N + 1), generator=g)
        if split == "icl_mq" or (split == "train" and s.match_query):
            ex[:, N] = ex[:, 0]
        elif split != "train":
            ex[:, N] = _other_exemplar(ex[:, 0], n_ex, g)
        order = torch.rand(b, N, generator=g).argsort(dim=1)  # shuffle the context, keep the query last
        ctx, labels, ex_ctx = ctx.gather(1, order), labels.gather(1, order), ex[:, :N].gather(1, order)
        classes = torch.cat([ctx, query[:, None]], dim=1)
        ex = torch.cat([ex_ctx, ex[:, N:]], dim=1)
        x = self.exemplars[classes, ex]
        batch = exemplar_label_batch(x, labels, target, classes, L)
        batch.extra["exemplar_ids"] = ex
        return batch


def _others_classes(task: FixedLabelsTask, query: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """``[b, k]`` distinct training classes per row whose fixed labels differ from the query's and
    from each other's (so the context's labels are distinct)."""
    s = task.spec
    L = s.n_labels
    lab = _others(L, task.fixed_label(query), k, g)
    return lab + L * torch.randint(s.n_classes // L, (query.shape[0], k), generator=g)
