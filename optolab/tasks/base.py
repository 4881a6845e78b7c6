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
- A task states its contract as data, so :func:`optolab.testing.check_task` can check it:
  ``holdouts()`` (ids that training must never show, read from ``Batch.extra``), ``icl_splits``
  (splits whose every target is recoverable from the context) and ``model_io()`` (shapes and
  ranges). Per-sequence provenance rides in ``Batch.extra``: ``classes`` ``[batch, items]``
  (class id of every exemplar, the query last; −1 for a class drawn fresh for one sequence),
  ``exemplar_ids``, ``exemplar_keys`` (one id per (class, exemplar)) and ``label_sets``
  ``[batch, k]`` (the sorted labels a sequence uses).
- A task class names its spec class as ``Spec``; the registry (:mod:`optolab.tasks.registry`)
  finds a task by ``kind`` (built-in or entry point) or by ``generator: package.module:Class``.
- A task is one module: whatever else optolab needs of it comes from the class, not from a list
  elsewhere. ``example_spec()`` is a small valid spec (tests, ``optolab tasks list``; default
  ``Spec()``) and ``spec_strategy()`` a hypothesis strategy of small valid specs for the contract
  tests (default None: :mod:`optolab.testing` derives one from ``Spec``'s fields). A built-in is
  any module of :mod:`optolab.tasks` defining a class with ``kind`` (found, not listed).
- ``data_stream`` says where training batches' randomness comes from: ``torch`` (the default, a
  ``torch.Generator`` per batch, :func:`rng`) or ``counter`` (:mod:`optolab.tasks.counter`, the
  same numbers on every device; a separate stream). A spec lists the streams its task has in
  ``DATA_STREAMS``; any other is refused in one line. The default is left out of dumps, so specs
  and resolved protocols written before the field existed are unchanged. A task with the counter
  stream also has ``train_batches(seeds, step, batch_size, device)``: every seed's batch at once,
  stacked on a leading member axis and drawn on ``device`` (equal to ``train_batch`` per seed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Bool, Int
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from torch import Tensor

from optolab.core.device import to_device
from optolab.core.errors import SpecError
from optolab.core.strict import StrictModel

IGNORE = -100


class TaskSpec(StrictModel):
    """Base of every task spec: unknown keys are errors, numbers are numbers
    (:mod:`optolab.core.strict`), and a spec is immutable once built.

    ``generator`` (``package.module:Class``) is how a protocol names a task class that is not
    built in; it is recorded in the resolved protocol so the run can be loaded again."""

    kind: str
    generator: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                  description="package.module:TaskClass of a user generator")
    task_seed: int = Field(0, description="seeds what defines the task itself (prototypes, splits)")
    data_stream: Literal["torch", "counter"] = Field(
        "torch", description="training batches' randomness: torch (default) or counter (same on every device)")

    # the data streams this spec's task has (see the module rules)
    DATA_STREAMS: ClassVar[tuple[str, ...]] = ("torch",)

    @model_validator(mode="after")
    def _stream(self) -> TaskSpec:
        if self.data_stream not in self.DATA_STREAMS:
            having = sorted({c.model_fields["kind"].default for c in _spec_classes()
                             if "counter" in c.DATA_STREAMS and isinstance(c.model_fields["kind"].default, str)})
            raise SpecError("data_stream", f"task kind '{self.kind}' has no {self.data_stream} data stream "
                            f"(it has: {', '.join(self.DATA_STREAMS)}; the counter stream is built for "
                            f"{', '.join(having) or 'no task'}).", "remove data_stream (or set it to torch).")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        out = handler(self)
        if isinstance(out, dict) and out.get("data_stream") == "torch":
            out.pop("data_stream")  # the default: dumps stay as they were before the field
        return out

    def static_bytes(self) -> int:
        """Memory the task allocates up front (exemplar banks, tables): checked by
        :mod:`optolab.protocol.footprint` before the task is built. 0 when nothing large."""
        return 0


@dataclass(frozen=True)
class Holdout:
    """Ids of one kind that training batches must never contain.

    ``field`` is a key of ``Batch.extra`` holding an integer tensor ``[batch, m]``. With
    ``per="item"`` every entry is an id; with ``per="row"`` each row (e.g. a sorted label set)
    is one id, given here as a tuple. ``splits`` are eval splits that must draw *only* held-out
    ids (so the split really tests generalisation); negative entries (fresh draws) are ignored.
    """

    field: str
    ids: frozenset
    per: str = "item"  # "item" | "row"
    splits: tuple[str, ...] = ()
    what: str = ""  # plain words for messages, e.g. "held-out classes"


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

    def to_device(self, device: torch.device) -> Batch:
        """This batch with every tensor (``extra``'s too) on ``device``; itself when already there."""
        if self.targets.device == device:
            return self
        moved = {k: to_device(v, device) for k, v in vars(self).items()}
        return Batch(**moved)


def _split(t: Any, S: int) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return t.reshape(S, t.shape[0] // S, *t.shape[1:]) if t.shape[0] % S == 0 and t.shape[0] >= S else \
        t.expand(S, *t.shape)  # a field shared by every row (``batch_or_1``)


def stacked(flat: Batch, S: int) -> Batch:
    """``flat`` (``S · b`` rows, member-major) as ``S`` batches stacked on a leading member axis."""
    fields = {k: _split(v, S) for k, v in vars(flat).items() if k not in ("inputs", "extra")}
    return Batch(inputs=tuple(_split(t, S) for t in flat.inputs), **fields,
                 extra={k: _split(v, S) for k, v in flat.extra.items()})


def unstacked(batch: Batch, i: int) -> Batch:
    """Member ``i`` of a stacked batch (see :func:`stacked`)."""
    def one(t: Any) -> Any:
        return t[i] if isinstance(t, torch.Tensor) else t

    fields = {k: one(v) for k, v in vars(batch).items() if k not in ("inputs", "extra")}
    return Batch(inputs=tuple(one(t) for t in batch.inputs), **fields,
                 extra={k: one(v) for k, v in batch.extra.items()})


def _spec_classes() -> list[type[TaskSpec]]:
    todo, seen = [TaskSpec], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def rng(*keys: int) -> torch.Generator:
    """A torch generator determined by a tuple of integers (seed, stream, step, ...)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class Task(ABC):
    """A synthetic sequence task. Subclasses set ``kind`` and implement the abstract methods."""

    kind: ClassVar[str]
    Spec: ClassVar[type[TaskSpec]]
    spec: TaskSpec

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    @classmethod
    def example_spec(cls) -> TaskSpec:
        """A small valid spec of this task (what tests build when they need one of each kind)."""
        return cls.Spec()

    @classmethod
    def spec_strategy(cls) -> Any:
        """A hypothesis strategy of small valid specs for the contract tests, or None (then
        :func:`optolab.testing.spec_strategy` derives one from ``Spec``'s fields)."""
        return None

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

    def check_split(self, split: str) -> None:
        """Raise ``KeyError`` naming the task's splits unless ``split`` is one of them."""
        if split not in self.eval_splits:
            raise KeyError(f"unknown split {split!r}; {self.kind} has {self.eval_splits}")

    def reference_losses(self) -> dict[str, float]:
        """Named loss levels that plots draw as horizontal lines (e.g. chance)."""
        return {}

    def token_probe_vocab(self) -> tuple[int, int | None] | None:
        """``(n_ordinary_tokens, bos_id)`` for Olsson-style token probes, or None."""
        return None

    def label_ids(self) -> Int[Tensor, "n"] | None:
        """Label ids whose embeddings the copying measure pushes through each head, or None."""
        return None

    # --- the contract (checked by optolab.testing.check_task) ---------------------------

    def holdouts(self) -> tuple[Holdout, ...]:
        """What training must never show (see :class:`Holdout`)."""
        return ()

    @property
    def icl_splits(self) -> tuple[str, ...]:
        """Eval splits whose every target can be read off the context: for exemplar-label tasks
        an earlier item of the query's class carries the target label; for token tasks the
        target follows an earlier occurrence of the current token."""
        return ()

    def reference_curves(self) -> dict[str, Tensor]:
        """Named per-position loss curves ``[n_ctx]`` (NaN where no loss is taken), e.g. the
        in-context unigram and bigram estimators of a Markov-chain task."""
        return {}

    def describe(self) -> list[str]:
        """A few lines in plain words: what a sequence is and what the splits test."""
        doc = (type(self).__doc__ or type(self).__module__).strip().splitlines()
        return [doc[0]] if doc else []
