"""Few-shot classification that only in-context learning solves (Singh et al. 2024, ANCHORS §1).

Rules:
- A sequence is ``x1 l1 … xN lN q``: ``burstiness`` context items of the query's class and one
  item from each of ``N − burstiness`` distinct distractor classes, in random order, then the
  query exemplar. The query's label is not input; the loss is taken at the query only.
- Labels are re-drawn per sequence (relabeling): an unordered set of ``1 + n_distractors``
  labels from ``0..n_labels−1`` is drawn from the *allowed* sets and randomly ordered; the
  query's class gets the first label. Classes have no fixed label, so in-weights learning is
  impossible. A ``heldout_label_frac`` of the label sets (chosen by ``task_seed``) never
  appears in training; ``fsl_val_rl`` uses only those.
- Exemplars are synthetic and fixed per (class, exemplar index): class prototypes of a chosen
  ``design`` plus within-class noise (Reddy-style mixing ``(g + ε ξ)/√(1+ε²)`` in the design's
  generating space). Training uses exemplars ``0..train_exemplars−1`` of the train classes;
  ``fsl_train_valex`` uses the others; ``fsl_test_class`` uses exemplar 0 of held-out classes
  (as the authors' code does).

Exemplar designs (ANCHORS §7; all give the ln 2 plateau then the drop; timing differs):
- ``relu_lowrank`` (default, scale 2): ``scale · relu(W z)``, ``z ~ N(0, I_r)``, a fixed
  ``W ~ N(0, 1/r)`` (so each coordinate of ``W z`` has unit variance) — closest to the paper's
  Omniglot features (loss 0.5 at ≈2.2e5 sequences, plateau ≈0.745, measured).
- ``lowrank`` (scale 2): ``scale · W z``.
- ``relu`` (scale 2): ``scale · relu(g)``, ``g ~ N(0, I/D)``.
- ``isotropic`` (scale 1): ``scale · g`` — ≈2.5× slower than the paper; all-8 previous-token
  clamp slower than none, as in the paper.
Input magnitude matters (larger is faster), so ``scale`` is recorded in every resolved protocol.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from optolab.core.errors import SpecError
import optolab.tasks.counter as counter
from optolab.tasks.base import IGNORE, Batch, Holdout, TaskSpec, rng, stacked, unstacked
from optolab.tasks.exemplars import Design, ExemplarLabelTask, default_scale, exemplar_bank

SPLITS = ("fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class")


class FewshotSpec(TaskSpec):
    kind: Literal["fewshot"] = "fewshot"
    n_train_classes: int = Field(50, ge=2, description="classes seen in training")
    n_test_classes: int = Field(100, ge=2, description="held-out classes (fsl_test_class)")
    n_exemplars: int = Field(5, ge=1, description="fixed exemplars per class")
    train_exemplars: int = Field(1, ge=1, description="exemplars 0..k-1 are used in training")
    dim: int = Field(512, ge=1, description="exemplar vector size")
    design: Design = "relu_lowrank"
    latent_dim: int = Field(16, ge=1, description="rank of the low-rank designs")
    scale: float | None = Field(None, gt=0, description="multiplier on every exemplar (default: 1 isotropic, else 2)")
    noise: float = Field(0.25, ge=0, description="within-class noise ε (Reddy mixing)")
    context_pairs: int = Field(2, ge=1, description="exemplar-label pairs before the query (N)")
    burstiness: int = Field(1, ge=1, description="context items of the query's class")
    n_labels: int = Field(5, ge=2, description="labels re-drawn per sequence (fs_relabel)")
    heldout_label_frac: float = Field(0.2, ge=0, lt=1, description="label sets held out of training")
    task_seed: int = Field(20, description="seeds prototypes and the label-set split")

    DATA_STREAMS: ClassVar[tuple[str, ...]] = ("torch", "counter")

    def static_bytes(self) -> int:
        bank = (self.n_train_classes + self.n_test_classes) * self.n_exemplars * max(self.dim, self.latent_dim)
        label_sets = math.comb(self.n_labels, min(self.n_distinct, self.n_labels)) * self.n_distinct
        return 4 * 2 * bank + 8 * 4 * label_sets  # the bank and its draws; every label set, listed

    @model_validator(mode="after")
    def _consistent(self) -> FewshotSpec:
        if self.scale is None:
            object.__setattr__(self, "scale", default_scale(self.design))
        if self.burstiness > self.context_pairs:
            raise SpecError("burstiness", f"burstiness ({self.burstiness}) cannot exceed context_pairs "
                            f"({self.context_pairs}).", "lower burstiness or raise context_pairs.")
        k = self.n_distinct
        if self.n_labels < k:
            raise SpecError("n_labels", f"each sequence needs {k} distinct labels but n_labels is {self.n_labels}.",
                            f"set n_labels >= {k}.")
        if self.n_train_classes < k or self.n_test_classes < k:
            raise SpecError("n_train_classes" if self.n_train_classes < k else "n_test_classes",
                            f"each sequence needs {k} distinct classes.", f"use at least {k} train and test classes.")
        if self.train_exemplars >= self.n_exemplars:
            raise SpecError("train_exemplars", f"train_exemplars ({self.train_exemplars}) must be below n_exemplars "
                            f"({self.n_exemplars}) so fsl_train_valex has held-out exemplars.",
                            "lower train_exemplars or raise n_exemplars.")
        n_sets = math.comb(self.n_labels, k)
        held = round(self.heldout_label_frac * n_sets)
        if self.heldout_label_frac > 0 and not 1 <= held < n_sets:
            raise SpecError("heldout_label_frac", f"{self.heldout_label_frac} of {n_sets} label sets holds out "
                            f"{held}.", "choose a fraction that leaves at least one set on each side, or 0.")
        return self

    @property
    def n_distinct(self) -> int:
        """Distinct classes (hence labels) per sequence."""
        return 1 + self.context_pairs - self.burstiness


class FewshotTask(ExemplarLabelTask):
    """Few-shot classification solvable only in context (Singh et al. 2024): x1 l1 … xN lN q."""

    kind = "fewshot"
    Spec = FewshotSpec
    spec: FewshotSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        task_seeds = st.integers(0, 2**31 - 1)

        @st.composite
        def draw_spec(draw: Any) -> FewshotSpec:
            context_pairs = draw(st.integers(1, 4))
            burstiness = draw(st.integers(1, context_pairs))
            k = 1 + context_pairs - burstiness
            n_labels = draw(st.integers(k + 1, k + 5))
            held = 0.3 if math.comb(n_labels, k) >= 4 else 0.0
            n_exemplars = draw(st.integers(2, 5))
            return FewshotSpec(
                n_train_classes=draw(st.integers(max(k, 2), 12)), n_test_classes=draw(st.integers(max(k, 2), 12)),
                n_exemplars=n_exemplars, train_exemplars=draw(st.integers(1, n_exemplars - 1)),
                dim=draw(st.integers(2, 24)), design=draw(st.sampled_from(["relu_lowrank", "lowrank", "relu", "isotropic"])),
                latent_dim=draw(st.integers(1, 6)), noise=draw(st.floats(0, 1)), context_pairs=context_pairs,
                burstiness=burstiness, n_labels=n_labels, heldout_label_frac=held, task_seed=draw(task_seeds),
                data_stream=draw(st.sampled_from(["torch", "counter"])))

        return draw_spec()

    # --- what the task is ---------------------------------------------------------------

    @property
    def eval_splits(self) -> tuple[str, ...]:
        # with heldout_label_frac 0 there are no held-out label sets, so no fsl_val_rl
        return tuple(s for s in SPLITS if s != "fsl_val_rl" or self.spec.heldout_label_frac > 0)

    def reference_losses(self) -> dict[str, float]:
        k = self.spec.n_distinct
        return {f"ln {k} (chance among context labels)": math.log(k),
                f"ln {self.spec.n_labels} (chance over labels)": math.log(self.spec.n_labels)}

    def label_ids(self) -> torch.Tensor:
        return torch.arange(self.spec.n_labels)

    @cached_property
    def label_sets(self) -> dict[str, torch.Tensor]:
        """Unordered label sets, split train / held-out: ``{"train": [m, k], "heldout": [m', k]}``."""
        s = self.spec
        sets = torch.tensor(list(itertools.combinations(range(s.n_labels), s.n_distinct)))
        order = torch.randperm(len(sets), generator=rng(s.task_seed, 1))
        held = round(s.heldout_label_frac * len(sets))
        return {"heldout": sets[order[:held]], "train": sets[order[held:]]}

    @cached_property
    def exemplars(self) -> torch.Tensor:
        """The fixed exemplar bank ``[n_train + n_test classes, n_exemplars, dim]``."""
        s = self.spec
        return exemplar_bank(rng(s.task_seed, 0), n_classes=s.n_train_classes + s.n_test_classes,
                             n_exemplars=s.n_exemplars, dim=s.dim, design=s.design,
                             latent_dim=s.latent_dim, noise=s.noise, scale=s.scale)

    # --- the contract -------------------------------------------------------------------

    def holdouts(self) -> tuple[Holdout, ...]:
        s = self.spec
        test_classes = range(s.n_train_classes, s.n_train_classes + s.n_test_classes)
        valex = {c * s.n_exemplars + e for c in range(s.n_train_classes)
                 for e in range(s.train_exemplars, s.n_exemplars)}
        out = [Holdout("classes", frozenset(test_classes), splits=("fsl_test_class",), what="held-out classes"),
               Holdout("exemplar_keys", frozenset(valex), splits=("fsl_train_valex",),
                       what="held-out exemplars of train classes")]
        if len(self.label_sets["heldout"]):
            out.append(Holdout("label_sets", frozenset(tuple(r) for r in self.label_sets["heldout"].tolist()),
                               per="row", splits=("fsl_val_rl",), what="held-out label sets"))
        return tuple(out)

    @property
    def icl_splits(self) -> tuple[str, ...]:
        return self.eval_splits

    # --- batches ------------------------------------------------------------------------

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        if self.spec.data_stream == "counter":
            return unstacked(self.train_batches([seed], step, batch_size), 0)
        return self._sample(rng(seed, 101, step), batch_size, classes="train", exemplars="train",
                            labels="train")

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        how = {
            "fsl_train": ("train", "train", "train"),
            "fsl_val_rl": ("train", "train", "heldout"),
            "fsl_train_valex": ("train", "heldout", "train"),
            "fsl_test_class": ("test", "first", "train"),
        }
        self.check_split(split)
        classes, exemplars, labels = how[split]
        return self._sample(rng(seed, 202, SPLITS.index(split)), n, classes=classes,
                            exemplars=exemplars, labels=labels)

    def train_batches(self, seeds: Sequence[int], step: int, batch_size: int,
                      device: torch.device | str = "cpu") -> Batch:
        """The counter stream's training batches of every seed at ``step``, stacked ``[S, batch, …]``
        and drawn on ``device``; ``train_batch`` is this for one seed on the CPU."""
        s = self.spec
        N, k, b = s.context_pairs, s.n_distinct, batch_size
        device = torch.device(device)
        key = counter.keys(seeds, 101, step, device=device)  # [S]
        S = len(key)
        # one draw, in this order: class keys, context order, label set, label order, exemplars
        w_cls, w_perm, w_set, w_lab, w_ex = counter.draws(key, [(b, s.n_train_classes), (b, N), (b,), (b, k),
                                                                (b, N + 1)])
        cls = counter.order(w_cls).topk(k, dim=-1).indices  # [S, b, k], distinct; slot 0 the query's
        perm = counter.order(w_perm).argsort(dim=-1)
        sets = self._on(device)["train"]
        chosen = sets[counter.below(w_set, len(sets))]  # [S, b, k]
        label_order = counter.order(w_lab).argsort(dim=-1)
        ex = counter.below(w_ex, s.train_exemplars)
        flat = self._assemble(cls.reshape(S * b, k), perm.reshape(S * b, N), chosen.reshape(S * b, k),
                              label_order.reshape(S * b, k), ex.reshape(S * b, N + 1), self._on(device)["bank"])
        return stacked(flat, S)

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The exemplar bank and the train label sets on ``device`` (moved once per device)."""
        cache = self.__dict__.setdefault("_device_copies", {})
        if device not in cache:
            cache[device] = {"bank": self.exemplars.to(device), "train": self.label_sets["train"].to(device)}
        return cache[device]

    def _sample(self, g: torch.Generator, b: int, *, classes: str, exemplars: str, labels: str) -> Batch:
        s = self.spec
        N, k = s.context_pairs, s.n_distinct
        n_cls = s.n_train_classes if classes == "train" else s.n_test_classes
        offset = 0 if classes == "train" else s.n_train_classes

        # distinct classes per sequence: slot 0 is the query's class, slots 1.. the distractors
        cls = torch.rand(b, n_cls, generator=g).topk(k, dim=1).indices + offset  # [b, k], distinct
        perm = torch.rand(b, N, generator=g).argsort(dim=1)  # the context's order
        # labels: an allowed unordered set, randomly ordered; slot j gets label order[j]
        sets = self.label_sets[labels]
        chosen = sets[torch.randint(len(sets), (b,), generator=g)]  # [b, k]
        label_order = torch.rand(b, k, generator=g).argsort(dim=1)

        if exemplars == "train":
            ex = torch.randint(s.train_exemplars, (b, N + 1), generator=g)
        elif exemplars == "heldout":
            ex = torch.randint(s.train_exemplars, s.n_exemplars, (b, N + 1), generator=g)
        else:
            ex = torch.zeros(b, N + 1, dtype=torch.long)
        return self._assemble(cls, perm, chosen, label_order, ex, self.exemplars)

    def _assemble(self, cls: torch.Tensor, perm: torch.Tensor, chosen: torch.Tensor, label_order: torch.Tensor,
                  ex: torch.Tensor, bank: torch.Tensor) -> Batch:
        """A batch from its draws (no randomness here): ``cls`` ``[b, k]`` the distinct classes (slot
        0 the query's), ``perm`` ``[b, N]`` the context's order of slots, ``chosen`` the label set,
        ``label_order`` its order over slots, ``ex`` ``[b, N+1]`` the exemplar indices."""
        s = self.spec
        N, B, k = s.context_pairs, s.burstiness, s.n_distinct
        b, dev = cls.shape[0], cls.device
        # context items: B of slot 0, one of each distractor slot, shuffled
        slots = torch.cat([torch.zeros(B, dtype=torch.long, device=dev), torch.arange(1, k, device=dev)])  # [N]
        ctx_slot = slots[perm]  # [b, N]
        item_slot = torch.cat([ctx_slot, torch.zeros(b, 1, dtype=torch.long, device=dev)], dim=1)  # + query
        item_cls = cls.gather(1, item_slot)  # [b, N+1]
        slot_label = chosen.gather(1, label_order)  # [b, k]
        ctx_labels = slot_label.gather(1, ctx_slot)  # [b, N]
        query_label = slot_label[:, 0]
        x = bank[item_cls, ex]  # [b, N+1, dim]

        n_ctx = 2 * N + 1
        targets = torch.full((b, n_ctx), IGNORE, dtype=torch.long, device=dev)
        targets[:, -1] = query_label
        label_pos = torch.arange(1, 2 * N, 2, device=dev)
        match = torch.zeros(b, n_ctx, dtype=torch.bool, device=dev)
        nonmatch = torch.zeros(b, n_ctx, dtype=torch.bool, device=dev)
        is_match = ctx_labels == query_label[:, None]
        match[:, label_pos] = is_match
        nonmatch[:, label_pos] = ~is_match
        present = torch.zeros(b, s.n_labels, dtype=torch.bool, device=dev).scatter_(1, ctx_labels, True)
        return Batch(inputs=(x, ctx_labels), targets=targets, match_mask=match, nonmatch_mask=nonmatch,
                     context_labels=present,
                     extra={"classes": item_cls, "exemplar_ids": ex, "query_label": query_label,
                            "exemplar_keys": item_cls * s.n_exemplars + ex,
                            "label_sets": chosen.sort(dim=1).values})
