"""The measure interface: what one module declares to add a progress measure.

A measure is a class with a name and hooks; the evaluator (:mod:`optolab.measures.evaluate`)
calls the hooks of every measure the protocol switches on and names none of them. Built-in
measures live in :mod:`optolab.measures.builtin`, one module each; third parties register theirs
by entry point (group ``optolab.measures``, :mod:`optolab.measures.registry`).

Rules for a measure:
- ``NAME`` is its switch in a protocol's ``measures:`` section (``measures.<NAME>: true``);
  ``DEFAULT`` whether it is on when the protocol does not say. ``OPTIONS`` are the settings it
  reads (``name -> (type, pydantic Field)``), with :meth:`Measure.options`: an installed measure's
  are namespaced under its name (``measures.<NAME>: {option: value}``), so they clash with no
  other measure's; a built-in's are flat keys of ``measures:``. A measure added later never stops an old run from resuming: a run's
  recorded protocol is read with today's defaults (:mod:`optolab.training.runbook`).
- ``SITES`` (per layer, e.g. ``blocks.{layer}.attn.hook_pattern``) are the hook sites it reads
  on every eval split; the evaluator saves them all in one call per split, through the run's
  Forward, so they hold the activations as the model used them (after interventions).
- :meth:`Measure.build` makes the fixed data it needs once per run from the eval seed (a probe
  batch); :meth:`Measure.on_split` turns one split's logits and saved sites (and, where it needs
  them, the model's weights) into rows;
  :meth:`Measure.on_model` makes rows from the weights or its own data (with the run's Forward).
  A measure that does not apply to a task or split returns no rows (the task's public interface
  says: ``batch.match_mask``, ``batch.induction_targets``, ``task.label_ids()``, …).
- A row is ``{split, metric, layer, head, value}`` (plus ``src_layer``/``src_head`` between two
  heads); ``layer``/``head`` are None for whole-model numbers. Measures read no global state and
  change nothing: they run under ``torch.no_grad`` on the model in eval mode.
- A measure too costly for every eval runs at checkpoints instead: it declares ``CONFIG`` (a
  strict pydantic model; ``measures.<NAME>:`` then takes ``false``, ``true`` for its defaults,
  or a mapping of its fields) and :meth:`Measure.on_checkpoint`, which the run calls at every
  ``CONFIG.every``-th checkpoint step (and the last) with a fresh Forward of the run's clamps.
  It may use gradients and write its own files under ``RUN_DIR/measures/<NAME>/``; it never changes the
  model it is given.
- What reads a run whole — ``summary.json``, its stages, the run's plots and a sweep's report —
  asks the measures, never names one. ``METRICS`` lists the metric names a measure writes (what
  ``optolab validate`` shows). ``CURVES`` offers its curves by *role* (:class:`Curve`):
  ``induction`` (the last layer's per-head score whose rise is when the induction head forms:
  the summary, stages, head-score plots and the report's ``score_midpoint`` take the first
  measure, in run order, whose curve the run measured), ``previous_token`` (the first layer's
  per-head score: stages and plots) and ``stage`` (a whole-model curve stages read both ways,
  e.g. the LLC). A curve whose points may be unreadable names a ``valid`` metric written beside
  it (1 where the point may be read, 0 where not, e.g. an LLC whose chains left the basin):
  stages read only its valid points. :meth:`Measure.summary` adds the measure's own entries to
  ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor


@dataclass
class SplitData:
    """One eval split, as the model saw it."""

    split: str
    batch: Any  # optolab.tasks.Batch
    logits: Tensor
    saved: dict[str, Tensor]  # every measure's SITES for every layer
    n_layers: int
    spec: Any  # the protocol's measures section
    model: Any = None  # the model evaluated (its weights, for measures that read both)
    main: bool = False  # whether this is the task's main split


@dataclass
class ModelData:
    """The model after an eval's splits, with what the measure built and the run's Forward."""

    model: Any
    forward: Any  # optolab.model.forward.Forward: clamps act as in training at this step
    step: int
    data: Any  # what build() returned
    sites: list[str]
    spec: Any


@dataclass
class CheckpointData:
    """A checkpoint, for measures that run at checkpoints (``on_checkpoint``)."""

    model: Any  # the run's model at this step (not to be changed)
    make_forward: Any  # () -> a fresh Forward with the run's clamp program (eager); the measure closes it
    plain_forward: Any  # () -> a Forward without clamps
    task: Any
    data: Any  # what training draws its batches from: the task, or the protocol's data schedule
    step: int
    sequences: int
    batch_size: int  # the run's train.batch_size
    total_steps: int  # the run's length in steps
    config: Any  # the measure's CONFIG instance
    folder: Any  # RUN_DIR/measures/<NAME>: where it may write its own files


@dataclass(frozen=True)
class Curve:
    """A curve a measure offers to summaries, stages, plots and reports (see the module rules):
    its ``metric``, ``role``, which layer (``first``/``last``; ``None`` for whole-model values),
    the split it is on (``None``: the task's main split), a title for plots, and the metric
    (same split and step) that says which of its points may be read (``None``: all)."""

    metric: str
    role: Literal["induction", "previous_token", "stage"]
    layer: Literal["first", "last"] | None = "last"
    split: str | None = None
    title: str = ""
    valid: str | None = None

    def layer_index(self, n_layers: int) -> int | None:
        return None if self.layer is None else 0 if self.layer == "first" else n_layers - 1


def head_rows(split: str, metric: str, per_head: Tensor, layer: int) -> list[dict]:
    return [{"split": split, "metric": metric, "layer": layer, "head": h, "value": float(v)}
            for h, v in enumerate(per_head.tolist())]


def model_row(split: str, metric: str, value: float) -> dict:
    return {"split": split, "metric": metric, "layer": None, "head": None, "value": value}


class Measure:
    """A progress measure (see the module rules)."""

    NAME: ClassVar[str] = ""
    DEFAULT: ClassVar[bool] = True
    OPTIONS: ClassVar[dict[str, tuple[Any, Any]]] = {}
    SITES: ClassVar[tuple[str, ...]] = ()
    DOC: ClassVar[str] = ""  # the switch's one-line description
    CONFIG: ClassVar[Any] = None  # a StrictModel for measures that run at checkpoints (see the rules)
    METRICS: ClassVar[tuple[str, ...]] = ()  # the metric names it writes
    CURVES: ClassVar[tuple[Curve, ...]] = ()  # what summaries, stages, plots and reports read (rules)

    def build(self, task, spec, seed: int, n_ctx: int) -> Any:
        return None

    def options(self, spec) -> Any:
        """This measure's ``OPTIONS`` in ``spec`` (a protocol's ``measures:``), by attribute:
        ``self.options(d.spec).max_lag``. An installed measure's options are namespaced under its
        ``NAME`` (:mod:`optolab.measures.registry`); a built-in's are flat in ``spec``."""
        own = getattr(spec, self.NAME, None)
        return spec if own is None or isinstance(own, bool) else own

    def summary(self, task, seed: int) -> dict:
        """Entries this measure adds to ``summary.json`` (``seed``: the run's eval seed)."""
        return {}

    def on_split(self, d: SplitData) -> list[dict]:
        return []

    def on_model(self, d: ModelData) -> list[dict]:
        return []

    def on_checkpoint(self, d: CheckpointData) -> list[dict]:
        return []

    def check(self, config, cfg) -> None:
        """Refuse (an OptolabError) a config this model or installation cannot run, before the
        run writes anything; ``cfg`` is the model's config."""

    def forget_after(self, folder, step: int) -> None:
        """A run resumes from the checkpoint at ``step`` (-1: starts clean): drop what this
        measure wrote in ``folder`` for later steps, as the metrics after it are dropped."""
