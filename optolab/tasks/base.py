"""The task interface: what a data generator promises the trainer and the measures.

Rules:
- A task is built from a validated spec (a pydantic model with a ``kind``) and is immutable.
  Everything random that defines the task itself (prototypes, class and label splits) comes from
  ``spec.task_seed``; batches come from a separate data or eval seed.
- ``train_batch(seed, step, batch_size)`` is a pure function of its arguments: resuming at step
  ``t`` regenerates exactly the batch an uninterrupted run saw at ``t``.
- ``eval_batch(split, seed, n)`` is a pure function too; the trainer calls it once per split.
- ``Batch.targets`` holds the target id at every position where the loss is taken and
  ``IGNORE`` (−100) elsewhere, so "where the loss is taken" is data, not code.
- Whatever the measures need rides on the batch as optional fields (``None`` when a task does
  not have that structure); measures that need a missing field are skipped, never faked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Bool, Int
from pydantic import BaseModel, ConfigDict
from torch import Tensor

IGNORE = -100


class TaskSpec(BaseModel):
    """Base of every task spec: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ModelIO:
    """What the model must look like to run this task."""

    input_mode: str  # "tokens" | "exemplar_label"
    n_ctx: int
    d_out: int
    d_vocab: int = 0
    d_input: int = 0
    n_labels: int = 0


@dataclass
class Batch:
    inputs: tuple[Tensor, ...]  # positional arguments of Transformer.forward
    targets: Int[Tensor, "batch pos"]  # IGNORE where no loss is taken
    # fewshot-style structure (label tokens in the context)
    match_mask: Bool[Tensor, "batch pos"] | None = None  # label tokens carrying the query's label
    nonmatch_mask: Bool[Tensor, "batch pos"] | None = None  # label tokens with another label
    context_labels: Bool[Tensor, "batch n_labels"] | None = None  # labels present in the context
    # token-sequence structure
    tokens: Int[Tensor, "batch pos"] | None = None
    induction_targets: Bool[Tensor, "batch_or_1 pos pos"] | None = None  # k follows an earlier copy of q
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])


def rng(*keys: int) -> torch.Generator:
    """A torch generator determined by a tuple of integers (seed, stream, step, ...)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class Task(ABC):
    """A synthetic sequence task. Subclasses set ``kind`` and implement the abstract methods."""

    kind: ClassVar[str]
    spec: TaskSpec

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    @abstractmethod
    def model_io(self) -> ModelIO: ...

    @property
    @abstractmethod
    def eval_splits(self) -> tuple[str, ...]: ...

    @property
    def main_split(self) -> str:
        """The split whose loss defines learning time (``time_to_loss_0.5``)."""
        return self.eval_splits[0]

    @abstractmethod
    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch: ...

    @abstractmethod
    def eval_batch(self, split: str, seed: int, n: int) -> Batch: ...

    def reference_losses(self) -> dict[str, float]:
        """Named loss levels that plots draw as horizontal lines (e.g. chance)."""
        return {}

    def token_probe_vocab(self) -> tuple[int, int | None] | None:
        """``(n_ordinary_tokens, bos_id)`` for Olsson-style token probes, or None."""
        return None

    def label_ids(self) -> Int[Tensor, "n"] | None:
        """Label ids whose embeddings the copying measure pushes through each head, or None."""
        return None
