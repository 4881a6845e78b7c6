"""Synthetic exemplars: fixed vectors per (class, exemplar index), in one of four designs.

Rules (ANCHORS §7):
- Every class has a prototype ``g`` in a generating space; exemplar ``j`` of the class is
  ``(g + ε ξ_j)/√(1+ε²)`` (Reddy-style mixing), so ``ε`` sets within-class spread.
- ``relu_lowrank`` (scale 2): ``scale · relu(W z)`` with a ``latent_dim``-dim latent and a fixed
  ``W ~ N(0, 1/r)``; ``lowrank``: without the relu; ``relu``: ``scale · relu(g)`` with
  ``g ~ N(0, I/D)``; ``isotropic`` (scale 1): ``scale · g``.
- :class:`HeldOutClassesSpec` is the spec of tasks over a bank of classes with fixed labels
  (class k → label k mod ``n_labels``) and held-out classes; each task's spec adds its own
  fields and may change the shared fields' defaults and bounds.
- :func:`exemplar_label_batch` lays out ``x1 l1 … xN lN q`` batches with the loss at the query
  and the label-token metadata the measures use; the ``classes`` it gets define what matches.
- The bank is a pure function of its arguments and the generator's state; the order of draws
  is fixed (prototypes, jitter, then ``W``) so banks do not change between versions.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import ClassVar, Literal

import torch
from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor

from optolab.core.errors import SpecError
from optolab.tasks.base import IGNORE, Batch, Holdout, ModelIO, Task, TaskSpec, rng

Design = Literal["relu_lowrank", "lowrank", "relu", "isotropic"]


def default_scale(design: str) -> float:
    return 1.0 if design == "isotropic" else 2.0


def exemplar_bank(g: torch.Generator, *, n_classes: int, n_exemplars: int, dim: int, design: str,
                  latent_dim: int, noise: float, scale: float) -> Float[Tensor, "cls ex dim"]:
    lowrank = design in ("relu_lowrank", "lowrank")
    gen_dim = latent_dim if lowrank else dim
    proto = torch.randn(n_classes, 1, gen_dim, generator=g)
    jitter = torch.randn(n_classes, n_exemplars, gen_dim, generator=g)
    latent = (proto + noise * jitter) / math.sqrt(1 + noise**2)
    if lowrank:
        W = torch.randn(gen_dim, dim, generator=g) / math.sqrt(gen_dim)
        x = latent @ W
    else:
        x = latent / math.sqrt(dim)
    if design.startswith("relu"):
        x = torch.relu(x)
    return (scale * x).contiguous()


class HeldOutClassesSpec(TaskSpec):
    """The exemplar bank and the class → label map shared by fixed-label tasks with held-out
    classes (see the module rules)."""

    n_classes: int = Field(1600, ge=2, description="training classes, each with a fixed label")
    n_labels: int | None = Field(None, ge=2, description="default: n_classes (one label per class)")
    n_holdout_classes: int = Field(10, ge=2, description="classes only the held-out splits use")
    n_exemplars: int = Field(20, ge=1, description="fixed exemplars per class")
    dim: int = Field(64, ge=1, description="exemplar vector size")
    design: Design = "relu_lowrank"
    latent_dim: int = Field(16, ge=1)
    scale: float | None = Field(None, gt=0, description="default: 1 isotropic, else 2")
    noise: float = Field(0.1, ge=0, description="within-class noise ε")
    context_pairs: int = Field(8, ge=2, description="N: exemplar-label pairs before the query")

    def static_bytes(self) -> int:
        return 4 * 2 * (self.n_classes + self.n_holdout_classes) * self.n_exemplars * max(self.dim, self.latent_dim)

    @model_validator(mode="after")
    def _bank(self) -> HeldOutClassesSpec:
        if self.scale is None:
            object.__setattr__(self, "scale", default_scale(self.design))
        if self.n_labels is None:
            object.__setattr__(self, "n_labels", self.n_classes)
        if self.n_labels > self.n_classes:
            raise SpecError("n_labels", f"n_labels ({self.n_labels}) exceeds n_classes ({self.n_classes}); labels "
                            "are fixed per class.", "use n_labels <= n_classes.")
        if self.n_classes % self.n_labels:
            raise SpecError("n_classes", f"n_classes ({self.n_classes}) must be a multiple of n_labels "
                            f"({self.n_labels}) for a balanced class→label map.",
                            "choose n_classes as a multiple of n_labels.")
        return self


class ExemplarLabelTask(Task):
    """A task of ``x1 l1 … xN lN q`` sequences: its spec has ``context_pairs`` (N), ``dim`` and
    ``n_labels``, and the model predicts one of ``n_labels`` at the query."""

    def model_io(self) -> ModelIO:
        s = self.spec
        return ModelIO(input_mode="exemplar_label", n_ctx=2 * s.context_pairs + 1, d_out=s.n_labels,
                       d_input=s.dim, n_labels=s.n_labels)


class HeldOutClassesTask(ExemplarLabelTask):
    """An exemplar–label task over ``n_classes`` training classes with fixed labels (class k →
    label k mod ``n_labels``) and ``n_holdout_classes`` more that only :attr:`HOLDOUT_SPLITS` show;
    its spec is a :class:`HeldOutClassesSpec`."""

    HOLDOUT_SPLITS: ClassVar[tuple[str, ...]] = ()

    def holdouts(self) -> tuple[Holdout, ...]:
        s = self.spec
        held = frozenset(range(s.n_classes, s.n_classes + s.n_holdout_classes))
        return (Holdout("classes", held, splits=self.HOLDOUT_SPLITS, what="held-out classes"),)

    def label_ids(self) -> torch.Tensor:
        return torch.arange(min(self.spec.n_labels, 512))

    @cached_property
    def exemplars(self) -> torch.Tensor:
        s = self.spec
        return exemplar_bank(rng(s.task_seed, 0), n_classes=s.n_classes + s.n_holdout_classes,
                             n_exemplars=s.n_exemplars, dim=s.dim, design=s.design, latent_dim=s.latent_dim,
                             noise=s.noise, scale=s.scale)


def exemplar_label_batch(x: torch.Tensor, ctx_labels: torch.Tensor, target: torch.Tensor, classes: torch.Tensor,
                    n_labels: int) -> Batch:
    """An ``x1 l1 … xN lN q`` batch with the loss at the query and label-token metadata."""
    b, N = ctx_labels.shape
    n_ctx = 2 * N + 1
    targets = torch.full((b, n_ctx), IGNORE, dtype=torch.long)
    targets[:, -1] = target
    label_pos = torch.arange(1, 2 * N, 2)
    is_match = classes[:, :N] == classes[:, N:]  # items of the query's class
    match = torch.zeros(b, n_ctx, dtype=torch.bool)
    nonmatch = torch.zeros(b, n_ctx, dtype=torch.bool)
    match[:, label_pos] = is_match
    nonmatch[:, label_pos] = ~is_match
    present = torch.zeros(b, n_labels, dtype=torch.bool).scatter_(1, ctx_labels, True)
    return Batch(inputs=(x, ctx_labels), targets=targets, match_mask=match, nonmatch_mask=nonmatch,
                 context_labels=present, extra={"classes": classes, "query_label": target})
