"""Data schedules: a protocol's ``data`` section switches the training task, or mixes tasks, in
step windows; outside every window the protocol's ``task`` trains.

Rules:
- ``data: {tasks: {NAME: TASK, …}, phases: [PHASE, …]}`` (a bare list is ``phases``). A TASK is
  written as ``task`` is (a path relative to the protocol file, ``{spec: PATH, overrides…}`` or a
  whole spec) and the resolved protocol records it inlined. A PHASE is ``{task: T, window: W}``
  (``T``: a name from ``tasks``, ``task`` for the protocol's own, or a TASK) or
  ``{mix: {NAME: weight, …}, window: W}``; ``W`` is written as a clamp's window
  (``{start, stop, unit}``, ``stop`` exclusive, default the whole run) and converts to steps as
  clamps' windows do (``ceil(sequences / batch_size)``). Windows may not overlap.
- Every task feeds the one model built for ``task``: their :class:`~optolab.tasks.base.ModelIO`
  (input mode, context length, vocabulary or input size, labels, outputs) must equal ``task``'s.
  A mixture's tasks must give batches of the same structure
  (:func:`~optolab.tasks.mixture.why_not_mixable`), and with clamps every task must (clamps
  were checked against ``task``'s batches). Each is refused at validation
  (:func:`check_data`) with one line naming the field.
- Determinism: the batch of step ``t`` depends only on ``(seeds.data, t)`` and the schedule. A
  single-task phase trains on ``that_task.train_batch(seeds.data, t, batch_size)``, exactly the
  batch that task's own run would see at ``t``. A mixture draws, per sequence, which task it
  comes from with a generator seeded from ``(seeds.data, MIX_STREAM, t)`` (independently, with
  the normalised weights as probabilities), and row ``i`` is row ``i`` of that task's own batch
  at ``t`` (:func:`~optolab.tasks.mixture.mix_rows`). So resuming mid-run, and an ensemble
  member, see what the uninterrupted solo run saw.
- Evaluations stay on ``task`` (its eval splits and seeds), whatever the schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, Field, SerializeAsAny, model_serializer, model_validator

from optolab.core.errors import OptolabError, SpecError
from optolab.core.schedule import Window
from optolab.core.strict import StrictModel, _number
from optolab.protocol.footprint import MAX_BYTES
from optolab.tasks import Task, TaskSpec, make_task, validate_task_spec
from optolab.tasks.base import Batch, rng
from optolab.tasks.mixture import mix_rows, why_not_mixable

OWN = "task"  # the protocol's own task, by name, in a phase or a mixture
MIX_STREAM = 0x6D6978  # "mix": the mixture draws' stream, apart from any task's own streams
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]+$")]
# StrictModel checks only fields typed float; a weight inside a mapping gets the same rule (yes/no
# and quoted text are not numbers, 1e-3 is)
Weight = Annotated[float, BeforeValidator(lambda v: _number(v, "float"))]


class DataPhase(StrictModel):
    task: str | SerializeAsAny[TaskSpec] | None = Field(
        None, description="a name from data.tasks, 'task' (the protocol's own), or a task (path or mapping)")
    mix: dict[Name, Weight] | None = Field(None, description="{name: weight}: each sequence's task is drawn with "
                                                            "these weights (normalised)")
    window: Window = Field(default_factory=Window)

    @model_validator(mode="after")
    def _one(self) -> DataPhase:
        if (self.task is None) == (self.mix is None):
            both = "both are given" if self.task is not None else "neither is given"
            raise SpecError("task", f"give exactly one of task or mix ({both}).",
                            "write task: NAME_OR_PATH to switch task, or mix: {name: weight, …} to mix tasks.")
        for name, w in (self.mix or {}).items():
            if not (math.isfinite(w) and w > 0):
                raise SpecError(f"mix.{name}", f"a weight must be a positive number (got {w}).",
                                "use weights > 0 (they are normalised); drop a task to leave it out.")
        return self


class DataSchedule(StrictModel):
    tasks: dict[Name, SerializeAsAny[TaskSpec]] = Field(
        default_factory=dict, description="named tasks for phases and mixtures (paths or mappings, as `task`)")
    phases: list[DataPhase] = Field(description="windows, each training on one task or a mixture")

    @model_validator(mode="before")
    @classmethod
    def _specs(cls, data: Any) -> Any:
        """A bare list is the phases; every task spec by its own schema, so errors name
        ``data.tasks.<name>.<field>`` or ``data.phases.<i>.task.<field>``."""
        if isinstance(data, list):
            data = {"phases": data}
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("tasks"), dict):
            data["tasks"] = {k: validate_task_spec(v, field=f"data.tasks.{k}") if isinstance(v, dict) else v
                             for k, v in data["tasks"].items()}
        if isinstance(data.get("phases"), list):
            data["phases"] = [{**p, "task": validate_task_spec(p["task"], field=f"data.phases.{i}.task")}
                              if isinstance(p, dict) and isinstance(p.get("task"), dict) else p
                              for i, p in enumerate(data["phases"])]
        return data

    @model_validator(mode="after")
    def _names(self) -> DataSchedule:
        if OWN in self.tasks:
            raise SpecError(f"tasks.{OWN}", f"'{OWN}' names the protocol's own task.",
                            "give this task another name.")
        if not self.phases:
            raise SpecError("phases", "no phases: the schedule would change nothing.",
                            "add a phase, or remove the data section.")
        known = [OWN, *self.tasks]
        for i, p in enumerate(self.phases):
            refs = [("task", p.task)] if isinstance(p.task, str) else [(f"mix.{n}", n) for n in p.mix or {}]
            for where, name in refs:
                if name not in known:
                    raise SpecError(f"phases.{i}.{where}", f"unknown task name '{name}'.",
                                    f"use one of {known} (define others under data.tasks), or give the task as a "
                                    "path or mapping (paths are read by load_protocol, relative to the protocol).")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        out = handler(self)
        specs = [*out.get("tasks", {}).values(), *(p["task"] for p in out.get("phases", [])
                                                   if isinstance(p.get("task"), dict))]
        for spec in specs:  # as the protocol records `task`: no generator unless one was named
            if spec.get("generator") is None:
                spec.pop("generator", None)
        for p in out.get("phases", []):  # a phase has a task or a mix: the other is not worth a line
            for k in ("task", "mix"):
                if k in p and p[k] is None:
                    del p[k]
        return out


def resolve_paths(raw: Any, resolve: Callable[[Any, str], Any]) -> Any:
    """``raw`` (a ``data`` section as written) with every task given as a path or
    ``{spec: PATH, …}`` inlined by the loader's ``resolve(raw, field)`` (paths relative to the
    protocol file); names stay names."""
    if isinstance(raw, list):
        raw = {"phases": raw}
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    tasks = raw.get("tasks")
    if isinstance(tasks, dict):
        out["tasks"] = {k: resolve(v, f"data.tasks.{k}") for k, v in tasks.items()}
    names = {OWN, *(tasks if isinstance(tasks, dict) else ())}
    if isinstance(raw.get("phases"), list):
        out["phases"] = [
            {**p, "task": resolve(p["task"], f"data.phases.{i}.task")}
            if isinstance(p, dict) and (isinstance(p.get("task"), dict)
                                        or (isinstance(p.get("task"), str) and p["task"] not in names)) else p
            for i, p in enumerate(raw["phases"])]
    return out


@dataclass(frozen=True)
class Phase:
    """One phase in steps ``[start, stop)``: the keys of its tasks (:func:`task_specs`) and their
    normalised weights (one task: weight 1)."""

    index: int
    start: int
    stop: int
    keys: tuple[str, ...]
    weights: tuple[float, ...]


def _key(i: int, p: DataPhase) -> str:
    return p.task if isinstance(p.task, str) else f"phases.{i}"


def task_specs(protocol) -> dict[str, TaskSpec]:
    """Every task the schedule may train on, by key: ``task`` (the protocol's own), the names of
    ``data.tasks``, and ``phases.<i>`` for a task written in a phase."""
    out: dict[str, TaskSpec] = {OWN: protocol.task, **protocol.data.tasks}
    out.update({f"phases.{i}": p.task for i, p in enumerate(protocol.data.phases) if isinstance(p.task, TaskSpec)})
    return out


def where(key: str) -> str:
    """The protocol field that defines the task ``key``."""
    if key == OWN:
        return OWN
    return f"data.{key}.task" if key.startswith("phases.") else f"data.tasks.{key}"


def phases(schedule: DataSchedule, bs: int, total: int) -> list[Phase]:
    """The phases in steps, checked against the budget (as clamps' windows are) and for overlaps."""
    out = []
    for i, p in enumerate(schedule.phases):
        w = p.window
        at = f"data.phases.{i}.window"
        per = bs if w.unit == "sequences" else 1
        end = total * per
        if w.start >= end:
            raise OptolabError(f"starts at {w.start:,} {w.unit}, at or past the end of training ({end:,} {w.unit}).",
                               field=f"{at}.start", fix=f"use a start below {end:,}, or train longer.")
        if w.stop is not None and w.stop > end:
            raise OptolabError(f"stops at {w.stop:,} {w.unit}, past the end of training ({end:,} {w.unit}).",
                               field=f"{at}.stop", fix=f"use a stop <= {end:,}, or omit it to run to the end.")
        start, stop = math.ceil(w.start / per), total if w.stop is None else math.ceil(w.stop / per)
        if stop <= start:
            raise OptolabError(f"the window [{w.start:,}, {w.stop:,}) {w.unit} covers no training step (a step s "
                               f"trains on the phase when start <= s·{per} < stop).", field=at,
                               fix=f"widen the window to span at least {per} {w.unit}, or use unit: steps.")
        if p.mix is not None:
            total_w = sum(p.mix.values())
            keys, weights = tuple(p.mix), tuple(v / total_w for v in p.mix.values())
        else:
            keys, weights = (_key(i, p),), (1.0,)
        out.append(Phase(i, start, stop, keys, weights))
    for a in out:
        for b in out:
            if a.index < b.index and a.start < b.stop and b.start < a.stop:
                raise OptolabError(f"phases {a.index} and {b.index} overlap (steps {max(a.start, b.start):,} to "
                                   f"{min(a.stop, b.stop):,}).", field=f"data.phases.{b.index}.window",
                                   fix="make the windows disjoint (one's stop <= the other's start); to train on "
                                       "two tasks at once, use one phase with mix: {a: w1, b: w2}.")
    return sorted(out, key=lambda p: p.start)


def _spec_key(spec: TaskSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, default=str)


class TrainData:
    """The training batches of a protocol with a ``data`` schedule; its :meth:`train_batch` stands
    in for the task's (see the module rules). Tasks written alike are built once."""

    def __init__(self, protocol, task: Task) -> None:
        self.task = task
        self.phases = phases(protocol.data, protocol.train.batch_size, protocol.train.total_steps)
        built = {_spec_key(protocol.task): task}
        self.tasks: dict[str, Task] = {}
        for key, spec in task_specs(protocol).items():
            k = _spec_key(spec)
            if k not in built:
                built[k] = make_task(spec)
            self.tasks[key] = built[k]

    def phase(self, step: int) -> Phase | None:
        return next((p for p in self.phases if p.start <= step < p.stop), None)

    def which(self, seed: int, step: int, batch_size: int, phase: Phase) -> torch.Tensor:
        """Each sequence's task, as an index into ``phase.keys`` (``[batch_size]``)."""
        g = rng(seed, MIX_STREAM, step)
        return torch.multinomial(torch.tensor(phase.weights, dtype=torch.float64), batch_size, replacement=True,
                                 generator=g)

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        phase = self.phase(step)
        if phase is None:
            return self.task.train_batch(seed, step, batch_size)
        if len(phase.keys) == 1:
            return self.tasks[phase.keys[0]].train_batch(seed, step, batch_size)
        which = self.which(seed, step, batch_size, phase)
        used = sorted(set(which.tolist()))  # a task no sequence drew is not generated
        batches = {phase.keys[k]: self.tasks[phase.keys[k]].train_batch(seed, step, batch_size) for k in used}
        reason = why_not_mixable(batches) if len(batches) > 1 else None
        if reason is not None:  # validation probed one batch; a task whose structure varies by step lands here
            raise OptolabError(f"at step {step} the mixture's batches cannot be mixed row-wise: {reason}.",
                               field=f"data.phases.{phase.index}.mix",
                               fix="mix tasks whose batches have the same structure, or switch between them in "
                                   "separate phases.")
        remap = torch.full((len(phase.keys),), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        return mix_rows(list(batches.values()), remap[which])


def train_data(protocol, task: Task) -> Task | TrainData:
    """What a training loop draws its batches from: the task itself without a schedule."""
    return task if protocol.data is None else TrainData(protocol, task)


def _io_diff(io, ref) -> str:
    names = ("input_mode", "n_ctx", "d_vocab", "d_input", "n_labels", "d_out")
    return ", ".join(f"{n} {getattr(io, n)} (task: {getattr(ref, n)})" for n in names
                     if getattr(io, n) != getattr(ref, n))


def check_data(protocol, task: Task) -> None:
    """Refuse a schedule the run could not train (see the module rules); ``task`` is the
    protocol's, built. Builds the schedule's tasks once, on the CPU."""
    if protocol.data is None:
        return
    specs = task_specs(protocol)
    distinct = {_spec_key(s): k for k, s in specs.items() if _spec_key(s) != _spec_key(protocol.task)}
    need = {k: specs[k].static_bytes() for k in distinct.values()}
    if sum(need.values()) + protocol.task.static_bytes() > MAX_BYTES:
        worst = max(need, key=need.get)
        raise OptolabError(f"the schedule's tasks would allocate about {sum(need.values()) / 2**30:,.0f} GiB "
                           f"({where(worst)}: {need[worst] / 2**30:,.0f} GiB).", field=where(worst),
                           fix=f"check the task's sizes for a typo; optolab refuses runs above "
                               f"{MAX_BYTES // 2**30} GiB.")
    data = TrainData(protocol, task)
    ref = task.model_io()
    for key, t in data.tasks.items():
        if key != OWN and t.model_io() != ref:
            raise OptolabError(f"this task does not fit the model built for `task`: {_io_diff(t.model_io(), ref)}.",
                               field=where(key), fix="every task of a run feeds one model: give it the same input "
                               "kind, context length, vocabulary or input size, labels and outputs as `task`.")
    probes = {key: t.train_batch(0, 0, 2) for key, t in data.tasks.items()}
    for p in data.phases:
        if len(p.keys) > 1:
            reason = why_not_mixable({k: probes[k] for k in p.keys})
            if reason is not None:
                raise OptolabError(f"these tasks cannot be mixed row-wise: {reason}.",
                                   field=f"data.phases.{p.index}.mix",
                                   fix="mix tasks whose batches have the same structure, or switch between them in "
                                       "separate phases.")
    if protocol.clamps:
        for key in data.tasks:
            reason = why_not_mixable({OWN: probes[OWN], key: probes[key]}) if key != OWN else None
            if reason is not None:
                raise OptolabError(f"the clamps were checked against `task`'s batches, and this task's differ: "
                                   f"{reason}.", field=where(key),
                                   fix="with clamps, schedule only tasks whose batches have the structure of "
                                       "`task`'s (e.g. the same kind with other parameters).")
