"""Sweeps: one protocol expanded over conditions × a grid of fields × seeds, run locally.

Rules:
- A sweep file names a base ``protocol`` (relative to the sweep file), ``seeds``, optional
  ``conditions`` (a list of ``{name, protocol?, set?}``: another base file and/or dotted-field
  overrides) and an optional ``grid`` (``{dotted.field: [values]}``, crossed with everything);
  a top-level ``set`` applies to every run (a condition's own ``set`` wins).
  ``reference`` names the condition other conditions are compared with in reports.
- Every run gets a stable, readable id: ``<condition>[__<field>-<value>…]_s<seed>``, and its own
  run directory ``OUT/<id>``. Every expanded protocol is validated before anything runs: an
  unknown field, an empty grid list or a duplicate condition name is one clear error.
- ``optolab sweep`` skips finished runs (``summary.json`` present; a diverged run is finished
  too, as failed, and stays so) and resumes unfinished ones
  from their checkpoints (the trainer does), so re-running the same command completes a sweep.
- Runs train through an executor (``optolab/executors.py``): a local process pool by default, or
  Ray (``--executor ray``) on a local instance or a cluster. Runs pack into ensembles
  (:func:`plan_jobs`, :mod:`optolab.training.ensemble`): with ``--pack auto`` (the default) runs that
  share a model and training settings and whose clamps need the same forward passes, across
  conditions; with ``--pack seeds`` only runs of one condition; ``--pack off`` trains every run
  alone.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from optolab.core.counts import Seed
from optolab.core.device import check_device
from optolab.core.errors import OptolabError, SpecError, from_validation_error, lookup_line
from optolab.core.lock import DirLock
from optolab.core.strict import StrictModel
from optolab.protocol.schema import Protocol
from optolab.training.rundir import write_atomic


class Condition(StrictModel):

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    protocol: str | None = Field(None, description="another base protocol (relative to the sweep file)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted field -> value overrides")


class SweepSpec(StrictModel):

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    protocol: str
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    conditions: list[Condition] = Field(default_factory=lambda: [Condition(name="base")], min_length=1)
    set: dict[str, Any] = Field(default_factory=dict,
                                description="dotted field -> value overrides for every run (a condition's own set wins)")
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    reference: str | None = None

    @field_validator("conditions")
    @classmethod
    def _unique(cls, conditions: list[Condition]) -> list[Condition]:
        names = [c.name for c in conditions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError("", f"condition names must be unique; {dup} appear more than once.",
                            "rename the repeated conditions.")
        return conditions

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for field, values in grid.items():
            if not values:
                raise SpecError(field, f"grid field '{field}' has no values.", "give at least one value, or remove it.")
            if field in VARIED or field == "seeds":
                raise SpecError(field, f"the sweep sets '{field}' for every run itself (seeds come from 'seeds:'), "
                                "so a grid over it would give identical runs.",
                                "list the seeds under 'seeds:' instead, and remove this grid field.")
        return grid


MAX_RUNS = 1000  # a sweep expands to at most this many runs unless --max-runs says more
VARIED = ("seeds.init", "seeds.data", "name")  # what a sweep sets per run itself


class PathError(ValueError):
    """A dotted path that does not lead anywhere in the protocol (message for the user)."""


def _set(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts (lists by index), creating mappings where missing; a path
    through a list needs an index inside it, and a path cannot go below a value."""
    parts = dotted.split(".")
    cur: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the protocol"
        if isinstance(cur, list):
            if not part.lstrip("-").isdigit():
                raise PathError(f"'{where}' is a list; '{part}' is not an index into it")
            k = int(part)
            if not -len(cur) <= k < len(cur):
                raise PathError(f"'{where}' has {len(cur)} item(s); there is no item {k} (the base protocol, or "
                                "some condition, has fewer)")
            if last:
                cur[k] = value
            else:
                cur = cur[k]
            continue
        if not isinstance(cur, dict):
            raise PathError(f"'{where}' is a value ({cur!r}), not a section with '{part}' in it")
        if last:
            cur[part] = value
        else:
            if not isinstance(cur.get(part), (dict, list)):
                cur[part] = {}
            cur = cur[part]


def _label(value: Any) -> str:
    """A value as it can appear in a run id (letters, digits, _ . + -)."""
    import re

    text = re.sub(r"[^A-Za-z0-9_.+-]", "", str(value).replace("/", "-"))
    return text[:24] or "x"


@dataclass(frozen=True)
class SweepRun:
    id: str
    protocol: Protocol
    condition: str
    point: dict  # grid field -> value
    seed: int

    @property
    def group(self) -> str:
        """The condition and grid point without the seed: what reports aggregate over."""
        return self.id.rsplit("_s", 1)[0]


def expand(spec: SweepSpec, base_dir: Path, source: str | None = None, lines: dict | None = None,
           max_runs: int = MAX_RUNS) -> dict[str, SweepRun]:
    """``run id -> SweepRun`` for every condition × grid point × seed, each validated. Errors
    name the sweep file (``source``) and the sweep field that caused them. A sweep of more than
    ``max_runs`` runs is refused before anything is expanded."""
    from optolab.protocol.loader import load_protocol

    fields = list(spec.grid)
    n_runs = len(spec.conditions) * math.prod(len(v) for v in spec.grid.values()) * len(spec.seeds)
    if n_runs > max_runs:
        raise OptolabError(f"this sweep expands to {n_runs:,} runs (conditions × grid × seeds), more than "
                           f"{max_runs:,}.", field="grid" if spec.grid else "seeds",
                           fix=f"check the grid for a typo, or pass --max-runs {n_runs} if you mean it.",
                           ).located(source, lines)
    runs: dict[str, SweepRun] = {}
    made_by: dict[str, dict] = {}  # run id -> the grid point that made it
    for k, cond in enumerate(spec.conditions):
        base_path = base_dir / (cond.protocol or spec.protocol)
        field = f"conditions.{k}.protocol" if cond.protocol else "protocol"
        if not base_path.is_file():
            raise OptolabError(f"base protocol '{base_path.name}' not found (looked for {base_path.resolve()}).",
                               field=field, fix="give a path relative to the sweep file.").located(source, lines)
        try:
            base = load_protocol(base_path).resolved()
        except OptolabError as e:
            raise OptolabError(f"its protocol is invalid: {e.format()}", field=field,
                               fix=None).located(source, lines) from None
        for values in itertools.product(*(spec.grid[f] for f in fields)):
            point = dict(zip(fields, values))
            for seed in spec.seeds:
                data = copy.deepcopy(base)
                for where, overrides in (("set", spec.set), (f"conditions.{k}.set", cond.set), ("grid", point)):
                    for dotted, value in overrides.items():
                        try:
                            _set(data, dotted, value)
                        except PathError as e:
                            raise OptolabError(f"{e} (condition '{cond.name}').", field=f"{where}.{dotted}",
                                               fix="give a path that exists in every condition's protocol, e.g. "
                                                   "clamps.0.strength.").located(source, lines) from None
                data["seeds"]["init"] = data["seeds"]["data"] = seed
                suffix = "".join(f"__{f.rsplit('.', 1)[-1]}-{_label(v)}" for f, v in point.items())
                run_id = f"{cond.name}{suffix}_s{seed}"
                if run_id in made_by and made_by[run_id] != point:
                    raise OptolabError(f"grid points {made_by[run_id]} and {point} get the same run id '{run_id}' "
                                       "(values are cut to 24 letters, digits and _ . + - in ids).",
                                       field="grid", fix="make the values differ early on, or split the sweep."
                                       ).located(source, lines)
                made_by[run_id] = point
                data["name"] = f"{spec.name}.{run_id}"
                protocol = _validate(data, run_id, {**spec.set, **cond.set, **point}, source, lines)
                runs[run_id] = SweepRun(run_id, protocol, cond.name, point, seed)
    return runs


def _validate(data: dict, run_id: str, overrides: dict, source: str | None, lines: dict | None) -> Protocol:
    from optolab.protocol.loader import validate_protocol

    try:
        return validate_protocol(data)
    except OptolabError as e:
        hint = f" (sweep run '{run_id}', overrides {sorted(overrides)})" if overrides else f" (sweep run '{run_id}')"
        # point at the sweep line that set the field when there is one (grid or a condition's set)
        culprit = next((f for f in overrides if e.field and (e.field == f or e.field.startswith(f + ".")
                                                             or f.startswith(e.field + "."))), None)
        where = lookup_line(lines or {}, f"grid.{culprit}") if culprit else None
        err = OptolabError(e.message + hint, field=e.field, fix=e.fix or "check the grid and condition fields.",
                           source=source, line=where)
        raise err from None


def load_sweep(path: str | Path, max_runs: int = MAX_RUNS) -> tuple[SweepSpec, dict[str, SweepRun]]:
    from optolab.protocol.loader import read_yaml

    data, lines = read_yaml(path, "sweep file")
    data = {"name": Path(path).stem, **data}
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e, source=str(path), lines=lines, model=SweepSpec) from None
    runs = expand(spec, Path(path).parent, str(path), lines, max_runs)
    if spec.reference is not None and spec.reference not in {c.name for c in spec.conditions}:
        raise OptolabError(f"reference '{spec.reference}' is not a condition name.", field="reference",
                           source=str(path), fix=f"use one of {[c.name for c in spec.conditions]}.")
    return spec, runs


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def _previous(run_dir: Path) -> str:
    """``skipped`` for a finished run; a diverged run stays failed (re-running it would diverge again)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") == "failed":
        return f"failed: diverged earlier ({summary.get('failure', {}).get('what', '?')}); not retried"
    return "skipped"


def _cost(protocol: Protocol) -> int:
    return protocol.train.total_steps * protocol.train.batch_size


PACKING = ("auto", "seeds", "off")


def plan_jobs(runs: dict[str, SweepRun], todo: list[str], out: Path, *, pack: str, max_pack: int,
              workers: int) -> list[list[str]]:
    """Group the runs to train into jobs. Packable runs (and runs that can resume together)
    share an ensemble of at most ``max_pack`` members when they have equal
    :func:`~optolab.training.ensemble.pack_key` and, with ``pack="auto"``, equal pass signatures (a
    union of conditions with other passes would run every pass for every member:
    :mod:`optolab.clamps.union`) and layer-clamp layers, or with ``pack="seeds"`` equal clamps. A group is split so
    every worker gets work, a condition's runs kept together where they fit; everything else
    trains alone. Longest jobs first."""
    from optolab.clamps.union import pass_signature
    from optolab.training.ensemble import condition_key, pack_key, resumable_together, why_not_packable

    groups: dict[tuple, list[str]] = {}
    singles: list[list[str]] = []
    for rid in todo:
        protocol = runs[rid].protocol
        if pack == "off" or why_not_packable(protocol) is not None:
            singles.append([rid])
        else:
            # with auto, also what the clamps' kinds ask members to agree on (the layers a layer clamp
            # cuts off the loss: members that depend on other parameters share Adam's step counts,
            # optolab.training.ensemble._adam)
            agree = tuple(sorted(map(repr, filter(None, (c.pack_constraint() for c in protocol.clamps)))))
            within = (pass_signature(protocol.clamps), agree) if pack == "auto" else condition_key(protocol)
            groups.setdefault((pack_key(protocol), within), []).append(rid)
    for group in groups.values():  # a condition's runs next to each other, conditions in order
        order = list(dict.fromkeys(condition_key(runs[rid].protocol) for rid in group))
        group.sort(key=lambda rid, order=order: order.index(condition_key(runs[rid].protocol)))
    jobs = list(singles)
    packable = sum(len(g) for g in groups.values()) or 1
    for group in groups.values():
        if not resumable_together([out / rid for rid in group]):
            jobs += [[rid] for rid in group]
            continue
        n_chunks = min(len(group), max(math.ceil(len(group) / max_pack), round(workers * len(group) / packable)))
        size = math.ceil(len(group) / n_chunks)
        jobs += [group[i: i + size] for i in range(0, len(group), size)]
    return sorted(jobs, key=lambda job: -_cost(runs[job[0]].protocol) * len(job) ** 0.5)


def plan_sweep(path: str | Path, out: str | Path, *, workers: int | None, pack: str, max_pack: int,
               max_runs: int = MAX_RUNS):
    """``(spec, runs, status of finished runs, jobs, workers)``: what :func:`run_sweep` would
    train, and how runs would pack (``optolab sweep --dry-run`` prints it)."""
    if pack not in PACKING:
        raise OptolabError(f"unknown packing '{pack}'.", field="--pack", fix="use auto, seeds or off.")
    if max_pack < 1:
        raise OptolabError(f"--max-pack must be at least 1 (got {max_pack}).", field="--max-pack",
                           fix="use e.g. --max-pack 8.")
    spec, runs = load_sweep(path, max_runs)
    out = Path(out)
    status = {rid: _previous(out / rid) for rid in runs if finished(out / rid)}
    todo = [rid for rid in runs if rid not in status]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    jobs = plan_jobs(runs, todo, out, pack=pack, max_pack=max_pack, workers=workers)
    return spec, runs, status, jobs, min(workers, len(jobs) or 1)


def on_device(resolved: dict, device: str | None) -> dict:
    return resolved if device is None else {**resolved, "train": {**resolved["train"], "device": device}}


def run_sweep(path: str | Path, out: str | Path, *, workers: int | None = None, executor: str = "local",
              address: str | None = None, pack: str = "auto", max_pack: int = 8,
              max_runs: int = MAX_RUNS, device: str | None = None) -> dict[str, str]:
    """Train every unfinished run of a sweep; ``{run id: "done" | "skipped" | "failed: …"}``.

    Bad input (the sweep file, the executor, an unreachable Ray address) raises before anything
    is written. A run that fails does not stop the others. ``device`` (``--device``) sets every
    run's ``train.device`` (not part of a run's identity: finished runs stay finished).
    """
    from optolab.experiments import executors

    if executor not in executors.EXECUTORS:
        raise OptolabError(f"unknown executor '{executor}'.", field="--executor",
                           fix=f"use one of {list(executors.EXECUTORS)}.")
    if device is not None:
        check_device(device, "--device")
    spec, runs, status, jobs, workers = plan_sweep(path, out, workers=workers, pack=pack, max_pack=max_pack,
                                                   max_runs=max_runs)
    out = Path(out)
    todo = [rid for rid in runs if rid not in status]
    ray = started = lock = None
    if executor == "ray" and todo:
        ray, started = executors.connect_ray(executors.ray_address(address), workers)
    try:
        lock = DirLock(out, "sweep")  # the sweep's own files (each run locks its own directory too)
        meta_path = out / "sweep.json"
        invocations = json.loads(meta_path.read_text()).get("invocations", []) if meta_path.is_file() else []
        invocations.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "executor": executor, "pack": pack,
                            "workers": workers, "jobs": jobs})  # which runs trained together, and how
        write_atomic(meta_path, json.dumps({
            "sweep": spec.model_dump(mode="json"), "source": str(Path(path).resolve()),
            "runs": {rid: {"condition": r.condition, "point": r.point, "seed": r.seed, "group": r.group}
                     for rid, r in runs.items()},
            "invocations": invocations}, indent=2, default=str))
        payload = [[(rid, on_device(runs[rid].protocol.resolved(), device)) for rid in job] for job in jobs]
        if ray is not None:
            executors.check_shared_storage(ray, out)
            status.update(executors.run_ray(payload, out, ray))
        else:
            status.update(executors.run_local(payload, out, workers))
    finally:
        if started:
            ray.shutdown()
        if lock is not None:
            lock.release()
    return status
