"""Sweeps: one protocol expanded over conditions × a grid of fields × seeds, run locally.

Rules:
- A sweep file names a base ``protocol`` (relative to the sweep file), ``seeds``, optional
  ``conditions`` (a list of ``{name, protocol?, clamps?, set?}``: another base file, clamps
  appended to the base's, and/or dotted-field overrides) and an optional ``grid``
  (``{dotted.field: [values]}``, crossed with everything); a top-level ``set`` applies to every
  run (a condition's own ``set`` wins). ``reference`` names the condition other conditions are
  compared with in reports.
- An optional ``design`` (screen, window_scan, dose: :mod:`optolab.experiments.designs`) is
  expanded into ordinary conditions first, from the shape and budget of its base protocol, and
  appended to the listed ones; errors in it name ``design.<field>``.
- A grid over a field that some condition lacks is refused in one line (a list index past the
  end, or a key its kind does not have), unless ``grid_where_present: true``: then each
  condition is crossed only with the grid fields its protocol has (a field no condition has is
  still refused).
- Every run gets a stable, readable id: ``<condition>[__<field>-<value>…]_s<seed>``, and its own
  run directory ``OUT/<id>``. Every expanded protocol is validated before anything runs: an
  unknown field, an empty grid list or a duplicate condition name is one clear error.
- ``optolab sweep`` skips finished runs (``summary.json`` present; a diverged run is finished
  too, as failed, and stays so) and resumes unfinished ones
  from their checkpoints (the trainer does), so re-running the same command completes a sweep.
- ``dense_evals`` (``{every, span, loss, around}``): the other conditions evaluate every
  ``every`` sequences over ``span`` (fractions) of the reference's time to ``loss``, as
  measured on its finished runs at the same grid point (the median over seeds, interpolated),
  so effects smaller than the usual eval spacing resolve. The sweep trains the reference's runs
  first, then the others with those extra evals (:func:`with_dense_evals`).
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

from pydantic import Field, ValidationError, field_validator, model_validator

from optolab.core.counts import PosCount, Seed
from optolab.core.device import check_device
from optolab.core.errors import OptolabError, SpecError, lookup_line
from optolab.core.lock import DirLock
from optolab.core.strict import StrictModel
from optolab.experiments.answering import StopAtAnswerField
from optolab.experiments.progress import LiveProgress
from optolab.protocol.schema import Protocol
from optolab.training.rundir import write_atomic


class Condition(StrictModel):

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    protocol: str | None = Field(None, description="another base protocol (relative to the sweep file)")
    clamps: list[dict[str, Any]] = Field(default_factory=list,
                                         description="clamps appended to the base protocol's (before any set)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted field -> value overrides")
    seeds: list[Seed] | None = Field(None, min_length=1, description="this condition's seeds (default: the "
                                                                     "sweep's; sequential rounds give open "
                                                                     "conditions more)")


class DenseEvals(StrictModel):
    """Evaluate the other conditions densely around the reference's loss drop (see the module rules)."""

    every: PosCount = Field(description="sequences between the extra evals")
    span: tuple[float, float] = Field((0.5, 1.5), description="from/to, as fractions of the reference's time")
    loss: float = Field(0.5, gt=0, description="the reference's time: its main loss's first crossing of this")
    around: str | None = Field(None, description="the condition whose drop it is (default: the sweep's reference)")

    @model_validator(mode="after")
    def _span(self) -> DenseEvals:
        lo, hi = self.span
        if not 0 <= lo < hi:
            raise SpecError("span", f"span {list(self.span)} is not [from, to) with 0 <= from < to.",
                            "use e.g. span: [0.5, 1.5].")
        return self


class SweepSpec(StrictModel):

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    protocol: str
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    conditions: list[Condition] = Field(default_factory=lambda: [Condition(name="base")], min_length=1)
    set: dict[str, Any] = Field(default_factory=dict,
                                description="dotted field -> value overrides for every run (a condition's own set wins)")
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    grid_where_present: bool = Field(False, description="cross each condition only with the grid fields its "
                                                        "protocol has (default: refuse a field some condition lacks)")
    design: dict[str, Any] | None = Field(None, description="a screen, window_scan or dose, expanded into "
                                                            "conditions (optolab.experiments.designs)")
    reference: str | None = None
    dense_evals: DenseEvals | None = Field(None, description="extra evals around the reference's loss drop")
    run_figures: bool = Field(True, description="write each run's figures (seconds per run; the report draws its own)")
    stop_at_answer: StopAtAnswerField = Field(
        None, description="stop runs once their loss crossing is seen, or censored at a cap (default: on for "
                          "design sweeps; optolab.experiments.answering)")

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


def _has(data: Any, dotted: str) -> bool:
    """Whether ``a.b.c`` leads to something in the (resolved) protocol: every default is filled
    in there, so a path that is absent is one this protocol does not have."""
    cur = data
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False
    return True


def _resolved_clamps(data: dict) -> dict:
    """``data`` with its clamps' defaults filled in (appended clamps are as written), so that
    :func:`_has` sees a default field as present; as written when they do not validate (the
    run's validation then says why)."""
    from optolab.clamps.registry import validate_clamps

    try:
        return {**data, "clamps": [c.model_dump(mode="json") for c in validate_clamps(data["clamps"], "clamps")]}
    except (OptolabError, ValidationError):
        return data


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


def _load_base(base_dir: Path, relative: str, field: str, source: str | None, lines: dict | None) -> dict:
    from optolab.protocol.loader import load_protocol

    base_path = base_dir / relative
    if not base_path.is_file():
        raise OptolabError(f"base protocol '{base_path.name}' not found (looked for {base_path.resolve()}).",
                           field=field, fix="give a path relative to the sweep file.").located(source, lines)
    try:
        return load_protocol(base_path).resolved()
    except OptolabError as e:
        raise OptolabError(f"its protocol is invalid: {e.format()}", field=field,
                           fix=None).located(source, lines) from None


def _override(data: dict, where: str, dotted: str, value: Any, condition: str, source: str | None,
              lines: dict | None) -> None:
    try:
        _set(data, dotted, value)
    except PathError as e:
        also = " (or set grid_where_present: true to apply the grid only where the path exists)" \
            if where == "grid" else ""
        raise OptolabError(f"{e} (condition '{condition}').", field=f"{where}.{dotted}",
                           fix="give a path that exists in every condition's protocol, e.g. "
                               f"clamps.0.strength{also}.").located(source, lines) from None


def apply_design(spec: SweepSpec, base_dir: Path, source: str | None = None, lines: dict | None = None,
                 max_runs: int = MAX_RUNS) -> tuple[SweepSpec, dict]:
    """``(spec, origins)``: the spec with its design's conditions appended to the listed ones
    (all of them when the file lists none) and ``reference`` defaulting to the design's, and
    ``{condition name: DesignCondition}`` to name design fields in errors. A design whose
    sweep would exceed ``max_runs`` runs is refused before its conditions are built."""
    from optolab.experiments import designs
    from optolab.protocol.loader import validate_protocol

    if spec.design is None:
        return spec, {}
    design = designs.parse(spec.design, source, lines)
    field = "design.protocol" if design.protocol else "protocol"
    data = _load_base(base_dir, design.protocol or spec.protocol, field, source, lines)
    for dotted, value in spec.set.items():
        _override(data, "set", dotted, value, "the design's base", source, lines)
    try:  # the shape and budget the design is laid out on
        base = validate_protocol(data)
    except OptolabError as e:
        raise OptolabError(f"the design's base protocol (with the sweep's set) is invalid: {e.format()}",
                           field=field, fix=None).located(source, lines) from None
    shape = designs.Shape(base.model.n_layers, base.model.n_heads, base.train.total_steps, base.train.batch_size)
    listed = spec.conditions if "conditions" in spec.model_fields_set else []
    n_runs = (len(listed) + design.count(shape)) * math.prod(len(v) for v in spec.grid.values()) * len(spec.seeds)
    if n_runs > max_runs:
        raise OptolabError(f"this sweep's design expands to {n_runs:,} runs (conditions × grid × seeds), more than "
                           f"{max_runs:,}.", field="design",
                           fix=f"check the design's lists for a typo, or pass --max-runs {n_runs} if you mean it.",
                           ).located(source, lines)
    made = design.conditions(shape, source, lines)
    taken = {c.name: k for k, c in enumerate(listed)}
    for c in made:
        if c.name in taken:
            raise OptolabError(f"the design makes a condition '{c.name}', and conditions.{taken[c.name]} has that "
                               "name too.", field="design", fix="rename one of them.").located(source, lines)
    conditions = [*listed, *(Condition(name=c.name, protocol=design.protocol, clamps=c.clamps) for c in made)]
    reference = spec.reference if spec.reference is not None else design.reference
    return spec.model_copy(update={"conditions": conditions, "reference": reference}), {c.name: c for c in made}


def expand(spec: SweepSpec, base_dir: Path, source: str | None = None, lines: dict | None = None,
           max_runs: int = MAX_RUNS, origins: dict | None = None) -> dict[str, SweepRun]:
    """``run id -> SweepRun`` for every condition × grid point × seed, each validated. Errors
    name the sweep file (``source``) and the sweep field that caused them. A sweep of more than
    ``max_runs`` runs is refused before anything is expanded. ``origins`` is what
    :func:`apply_design` returned for ``spec``; without it, the spec's design is applied here."""
    if origins is None:
        spec, origins = apply_design(spec, base_dir, source, lines, max_runs)
    fields = list(spec.grid)
    n_runs = sum(len(c.seeds or spec.seeds) for c in spec.conditions) * math.prod(len(v) for v in spec.grid.values())
    if n_runs > max_runs:
        raise OptolabError(f"this sweep expands to {n_runs:,} runs (conditions × grid × seeds), more than "
                           f"{max_runs:,}.", field="grid" if spec.grid else "seeds",
                           fix=f"check the grid for a typo, or pass --max-runs {n_runs} if you mean it.",
                           ).located(source, lines)
    runs: dict[str, SweepRun] = {}
    made_by: dict[str, dict] = {}  # run id -> the grid point that made it
    used: set[str] = set()  # grid fields some condition has (grid_where_present)
    bases: dict[str, dict] = {}  # a design's conditions share one base file: load it once
    for k, cond in enumerate(spec.conditions):
        field = f"conditions.{k}.protocol" if cond.protocol else "protocol"
        if origins.get(cond.name) is not None and cond.protocol:
            field = "design.protocol"
        relative = cond.protocol or spec.protocol
        if relative not in bases:
            bases[relative] = _load_base(base_dir, relative, field, source, lines)
        prepared = copy.deepcopy(bases[relative])
        n_base = len(prepared["clamps"])
        prepared["clamps"] = [*prepared["clamps"], *copy.deepcopy(cond.clamps)]
        for where, overrides in (("set", spec.set), (f"conditions.{k}.set", cond.set)):
            for dotted, value in overrides.items():
                _override(prepared, where, dotted, value, cond.name, source, lines)
        here = [f for f in fields if not spec.grid_where_present or _has(_resolved_clamps(prepared), f)]
        used.update(here)
        for values in itertools.product(*(spec.grid[f] for f in here)):
            point = dict(zip(here, values))
            for seed in cond.seeds or spec.seeds:
                data = copy.deepcopy(prepared)
                for dotted, value in point.items():
                    _override(data, "grid", dotted, value, cond.name, source, lines)
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
                protocol = _validate(data, run_id, {**spec.set, **cond.set, **point}, source, lines,
                                     (n_base, origins.get(cond.name)), point)
                runs[run_id] = SweepRun(run_id, protocol, cond.name, point, seed)
    missing = [f for f in fields if f not in used]
    if missing:  # only with grid_where_present: a field no condition has is a typo, not a choice
        raise OptolabError(f"grid field '{missing[0]}' is in no condition's protocol, so it would vary nothing.",
                           field=f"grid.{missing[0]}", fix="check its spelling against a resolved protocol "
                           "(optolab validate), or remove it.").located(source, lines)
    return runs


def _validate(data: dict, run_id: str, overrides: dict, source: str | None, lines: dict | None,
              origin: tuple[int, Any] = (0, None), point: dict | None = None) -> Protocol:
    import re

    from optolab.protocol.loader import validate_protocol

    try:
        return validate_protocol(data)
    except OptolabError as e:
        hint = f" (sweep run '{run_id}', overrides {sorted(overrides)})" if overrides else f" (sweep run '{run_id}')"
        n_base, made = origin
        hit = re.fullmatch(r"clamps\.(\d+)(?:\.(.*))?", e.field or "") if made is not None else None
        if hit and 0 <= int(hit.group(1)) - n_base < len(made.origins):
            # a clamp the design made: name the design field that made it
            field = made.field_for(int(hit.group(1)) - n_base, hit.group(2) or "", e.message.startswith("unknown key"))
            raise OptolabError(e.message + f" (sweep run '{run_id}', {e.field} of its protocol)", field=field,
                               fix=e.fix or "check the design.", source=source,
                               line=lookup_line(lines or {}, field)) from None
        # point at the sweep line that set the field when there is one (grid or a condition's set)
        culprit = next((f for f in overrides if e.field and (e.field == f or e.field.startswith(f + ".")
                                                             or f.startswith(e.field + "."))), None)
        where = lookup_line(lines or {}, f"grid.{culprit}") if culprit else None
        fix = e.fix or "check the grid and condition fields."
        if culprit in (point or {}) and e.message.startswith("unknown key"):  # the grid added it
            fix += (" If only some conditions have this field, set grid_where_present: true to apply the grid "
                    "only where it exists.")
        err = OptolabError(e.message + hint, field=e.field, fix=fix, source=source, line=where)
        raise err from None


def load_sweep(path: str | Path, max_runs: int = MAX_RUNS) -> tuple[SweepSpec, dict[str, SweepRun]]:
    from optolab.protocol.loader import read_spec

    spec, lines = read_spec(path, "sweep file", SweepSpec)
    spec, origins = apply_design(spec, Path(path).parent, str(path), lines, max_runs)
    runs = expand(spec, Path(path).parent, str(path), lines, max_runs, origins)
    if spec.reference is not None and spec.reference not in {c.name for c in spec.conditions}:
        field = "reference" if "reference" in spec.model_fields_set else "design.reference"
        raise OptolabError(f"reference '{spec.reference}' is not a condition name.", field=field,
                           source=str(path), fix=f"use one of {[c.name for c in spec.conditions]}.")
    if spec.dense_evals is not None and dense_around(spec) not in {c.name for c in spec.conditions}:
        raise OptolabError(f"dense_evals needs a condition to evaluate around, and '{dense_around(spec)}' is not one.",
                           field="dense_evals.around", source=str(path),
                           fix="set dense_evals.around (or the sweep's reference) to a condition name.")
    return spec, runs


def dense_around(spec: SweepSpec) -> str | None:
    return spec.dense_evals.around or spec.reference if spec.dense_evals is not None else None


def _crossing(run_dir: Path, loss: float) -> float | None:
    """A finished run's main loss's first crossing of ``loss``, interpolated (sequences)."""
    import pandas as pd

    from optolab.experiments.stats import crossing_time

    main = json.loads((run_dir / "summary.json").read_text()).get("main_split")
    m = pd.read_parquet(run_dir / "metrics.parquet")
    curve = m[(m.split == main) & (m.metric == "loss")].sort_values("step")
    return crossing_time(curve.sequences.to_numpy(), curve.value.to_numpy(), loss).time


def with_dense_evals(spec: SweepSpec, runs: dict[str, SweepRun], out: Path) -> tuple[dict[str, SweepRun], list[str]]:
    """``(runs, waiting)``: with ``dense_evals``, every run of another condition gets extra evals
    every ``dense_evals.every`` sequences over ``span`` × the reference's median time at the same
    grid point (``measures.schedule.at``). They can only be placed once the reference's runs have
    finished: until then, ``waiting`` lists the other runs (the sweep trains the reference first,
    then them). A reference that never crossed gives no extra evals. The points depend only on
    the reference's finished results, so a re-run expands the same protocols."""
    around = dense_around(spec)
    if around is None:
        return runs, []
    d = spec.dense_evals
    by_point: dict[str, list[str]] = {}
    for rid, r in runs.items():
        by_point.setdefault(json.dumps(r.point, sort_keys=True, default=str), []).append(rid)
    waiting: list[str] = []
    for ids in by_point.values():
        refs = [rid for rid in ids if runs[rid].condition == around]
        others = [rid for rid in ids if runs[rid].condition != around]
        if not all(finished(out / rid) for rid in refs):
            waiting += others
            continue
        times = sorted(t for t in (_crossing(out / rid, d.loss) for rid in refs) if t is not None)
        if not times or not others:
            continue
        from optolab.experiments.stats import median

        t = median(times)
        for rid in others:
            r = runs[rid]
            data = r.protocol.resolved()
            sched = data["measures"]["schedule"]
            bs = data["train"]["batch_size"]
            end = r.protocol.train.total_steps * bs
            per = 1 if sched["unit"] == "sequences" else bs
            first = math.ceil(d.span[0] * t / d.every) * d.every
            points = [p // per for p in range(first, min(int(d.span[1] * t), end) + 1, d.every)]
            sched["at"] = sorted(set(sched.get("at", [])) | set(points))
            runs[rid] = SweepRun(rid, _validate(data, rid, {}, None, None), r.condition, r.point, r.seed)
    return runs, waiting


def with_stop(spec: SweepSpec, runs: dict[str, SweepRun], out: Path) -> tuple[dict[str, SweepRun], list[str]]:
    """``(runs, waiting)``: every run with the sweep's stop-at-answer rule as its ``train.stop``
    (:mod:`optolab.experiments.answering`); with a cap, runs of other conditions get it once the
    reference's runs at their grid point have finished, and wait until then."""
    from optolab.experiments import answering

    rule = answering.resolve(spec.stop_at_answer, spec.design is not None)
    if rule is None:
        return runs, []
    ref = spec.reference if rule.cap is not None else None
    by_point: dict[str, list[str]] = {}
    for rid, r in runs.items():
        by_point.setdefault(json.dumps(r.point, sort_keys=True, default=str), []).append(rid)
    waiting: list[str] = []
    for ids in by_point.values():
        refs = [rid for rid in ids if runs[rid].condition == ref]
        cap = None
        if refs and all(finished(out / rid) for rid in refs):
            cap = answering.cap_sequences(rule, [_crossing(out / rid, rule.loss) for rid in refs])
        for rid in ids:
            r = runs[rid]
            if refs and r.condition != ref and not all(finished(out / x) for x in refs):
                waiting.append(rid)
                continue
            data = r.protocol.resolved()
            data["train"]["stop"] = answering.rule(rule, None if r.condition == ref else cap)
            runs[rid] = SweepRun(rid, _validate(data, rid, {}, None, None), r.condition, r.point, r.seed)
    return runs, waiting


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def _previous(run_dir: Path) -> str:
    """``skipped`` for a finished run; a diverged run stays failed (re-running it would diverge again)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") == "failed":
        return f"failed: diverged earlier ({summary.get('failure', {}).get('what', '?')}); not retried"
    return "skipped"


def _resumes(run_dir: Path, run: SweepRun) -> bool:
    """A run stopped at its answer that this sweep asks to train on (no stop rule now)."""
    from optolab.training.rundir import RunDir
    from optolab.training.stopping import was_stopped

    return run.protocol.train.stop is None and was_stopped(RunDir(run_dir))


def _last_checkpoint(run_dir: Path) -> int:
    from optolab.model.checkpoint import list_checkpoints

    return (list_checkpoints(run_dir / "checkpoints") or [-1])[-1]


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
    every worker gets work, into a multiple of ``workers`` jobs of near-equal size when it needs more
    jobs than workers, a condition's runs kept together where they fit; everything else
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
    for key in list(groups):  # runs resume together only from one checkpoint step: split by it, keep packing
        if not resumable_together([out / rid for rid in groups[key]]):
            by_step: dict = {}
            for rid in groups.pop(key):
                by_step.setdefault(_last_checkpoint(out / rid), []).append(rid)
            groups.update({(*key, step): ids for step, ids in by_step.items()})
    for group in groups.values():
        n = len(group)
        n_chunks = min(n, max(math.ceil(n / max_pack), round(workers * n / packable)))
        if n_chunks > workers:  # whole waves: on 2 workers, 8 jobs of 14 end before 7 of 16 (4 waves, the last half empty)
            n_chunks = min(n, math.ceil(n_chunks / workers) * workers)
        jobs += [group[i * n // n_chunks: (i + 1) * n // n_chunks] for i in range(n_chunks)]
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
    runs, waiting = with_dense_evals(spec, runs, out)
    runs, also = with_stop(spec, runs, out)
    waiting = sorted(set(waiting) | set(also))
    status = {rid: _previous(out / rid) for rid in runs if finished(out / rid) and not _resumes(out / rid, runs[rid])}
    todo = [rid for rid in runs if rid not in status and rid not in waiting]
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
    status: dict[str, str] = {}
    waiting: set[str] = set()
    for phase in (0, 1):  # with dense_evals: the reference first, then the runs placed around its drop
        spec, runs, done, jobs, n_workers = plan_sweep(path, out, workers=workers, pack=pack, max_pack=max_pack,
                                                       max_runs=max_runs)
        if phase == 0:
            status.update(done)
            waiting = set(runs) - set(done) - {rid for job in jobs for rid in job}
        else:  # only what waited for the reference (a run that failed above waits for the next command)
            jobs = [kept for job in jobs if (kept := [rid for rid in job if rid in waiting])]
            if not jobs:
                break
        status.update(_train_jobs(spec, runs, jobs, n_workers, Path(path), Path(out), executor, address, device,
                                  pack))
        if not waiting:
            break
    return status


def _train_jobs(spec: SweepSpec, runs: dict[str, SweepRun], jobs: list[list[str]], workers: int, path: Path,
                out: Path, executor: str, address: str | None, device: str | None, pack: str) -> dict[str, str]:
    from optolab.experiments import executors

    status: dict[str, str] = {}
    ray = started = lock = None
    if executor == "ray" and jobs:
        ray, started = executors.connect_ray(executors.ray_address(address), workers)
    try:
        lock = DirLock(out, "sweep")  # the sweep's own files (each run locks its own directory too)
        meta_path = out / "sweep.json"
        invocations = json.loads(meta_path.read_text()).get("invocations", []) if meta_path.is_file() else []
        invocations.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "executor": executor, "pack": pack,
                            "workers": workers, "jobs": jobs})  # which runs trained together, and how
        write_atomic(meta_path, json.dumps({
            "sweep": spec.model_dump(mode="json"), "source": str(path.resolve()),
            "runs": {rid: {"condition": r.condition, "point": r.point, "seed": r.seed, "group": r.group}
                     for rid, r in runs.items()},
            "invocations": invocations}, indent=2, default=str))
        payload = [[(rid, on_device(runs[rid].protocol.resolved(), device)) for rid in job] for job in jobs]
        totals = {rid: runs[rid].protocol.train.total_steps for job in jobs for rid in job}
        with LiveProgress(out, totals, any(runs[rid].protocol.train.stop for rid in totals)):
            if ray is not None:
                executors.check_shared_storage(ray, out)
                status.update(executors.run_ray(payload, out, ray, figures=spec.run_figures))
            else:
                status.update(executors.run_local(payload, out, workers, figures=spec.run_figures))
    finally:
        if started:
            ray.shutdown()
        if lock is not None:
            lock.release()
    return status
