"""``optolab discover FILE --out DIR``: screen -> confirmation -> critical windows -> dose, each
stage an ordinary sweep directory, one formation map at the end.

Rules:
- The file (:class:`DiscoverSpec`) names a base ``protocol``, ``targets`` and ``interventions``
  (as a screen design's: :mod:`optolab.experiments.designs`), the ``question`` (a loss crossing:
  every run stops at its answer or is censored at ``cap`` × the reference's crossing,
  :mod:`optolab.experiments.answering`), the seed rule (:mod:`optolab.experiments.sequential`),
  and the later stages' settings. The reference is the base protocol with no extra clamp.
- **screen** (``OUT/1_screen``): every target × intervention against the reference, in
  sequential rounds: ``seeds.start`` seeds each, then ``seeds.add`` more for conditions still
  open, up to ``seeds.max``. Each condition gets a verdict (effect, null within ``margin``, or
  open) and a Holm-corrected signed-rank test over the screen. The first round's reference runs
  train first (their median crossing sets the cap); every later round, and every later stage,
  is capped there, so its runs train together.
- **What runs evaluate** (``evals``): ``question`` (default) evaluates the main split only, every
  measure and per-example loss off (:func:`run_set`): the verdicts read nothing else, training is
  unchanged (the main split's rows equal a full eval's: ``tests/test_eval_splits.py``).
- **confirm** (``OUT/2_confirm``): the screen's effects again on fresh seeds (``confirm.offset``
  onwards; a screen's winners are selected, so their screen CIs are optimistic), the same rounds.
  Confirmed: an effect in the screen's direction.
- **windows** (``OUT/3_windows``): for the ``windows.top`` strongest confirmed conditions, the
  latest start and earliest stop of a window that still moves the time by ``windows.effect``,
  by bisection (:mod:`optolab.experiments.window_search`) in units of the reference's event
  (``relative_to``), paired with the confirmation's reference runs.
- **dose** (``OUT/4_dose``): the strongest confirmed condition whose intervention has a
  ``dose`` entry, with that field at each value, paired with the confirmation's reference.
- Each stage writes its sweep file(s) next to its directory and records its verdicts in
  ``OUT/discover.json`` when it ends; a re-run skips recorded stages and, inside a stage, the
  sweep skips finished runs, so the same command resumes at any point (stage boundaries are
  tested). ``formation_map.md`` is written from ``discover.json`` (:mod:`optolab.experiments.formation_map`).
- Compute per stage is the sum of its runs' ``meta.json`` wall times (one thread per run: CPU-s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from optolab.core.counts import Count, PosCount
from optolab.core.errors import OptolabError, SpecError
from optolab.core.strict import StrictModel
from optolab.experiments.answering import StopAtAnswerSpec
from optolab.experiments.designs import Targets
from optolab.training.rundir import write_atomic

STAGES = ("screen", "confirm", "windows", "dose")
DETECTOR_EVALS = 3  # evals past the crossing the phase detector needs to see a drop end (stop-at-answer's default)
REFERENCE = "reference"


class SeedRule(StrictModel):
    start: PosCount = Field(7, description="seeds per condition in the first round (2·2^-start <= alpha / looks)")
    add: PosCount = Field(2, description="seeds added to an open condition per round")
    max: PosCount = Field(11, description="the most seeds a condition gets")

    @model_validator(mode="after")
    def _cap_holds_the_start(self) -> SeedRule:
        if self.max < self.start:
            raise SpecError("max", f"max ({self.max}) is below start ({self.start}): the first round would already "
                                   "pass the seed cap.", "raise max to at least start, or lower start.")
        return self


class ConfirmSpec(SeedRule):
    offset: Count = Field(1000, description="fresh seeds start here")


class WindowSpec(StrictModel):
    effect: float = Field(0.1, gt=0, description="a window holds when it moves the time by at least this fraction")
    resolution: float = Field(0.25, gt=0, description="bracket width to stop at, in units of the event time")
    relative_to: str = Field("crossing", pattern="^(crossing|drop_onset|plateau_onset)$")
    seeds: PosCount = Field(4, description="seeds per probe (the confirmation's first seeds)")
    top: Count = Field(2, description="search the windows of this many strongest confirmed conditions")


class DoseSpec(StrictModel):
    field: str = Field(description="the clamp field to vary, e.g. strength")
    values: list[float] = Field(min_length=1)


class Budget(StrictModel):
    max_runs: PosCount = Field(1000, description="no round starts that would take the discovery past this many runs")


class DiscoverSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    protocol: str = Field(description="the base protocol, relative to this file")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides for every run")
    targets: Targets
    interventions: dict[str, dict[str, Any]] = Field(min_length=1)
    question: StopAtAnswerSpec = Field(default_factory=StopAtAnswerSpec)
    seeds: SeedRule = Field(default_factory=SeedRule)
    margin: float = Field(0.1, gt=0, description="a null: the ratio's CI within [1/(1+margin), 1+margin]")
    alpha: float = Field(0.05, gt=0, lt=1, description="each comparison's error rate over its rounds (the signed-rank "
                                                         "test at alpha / looks), and the screen's Holm level")
    confirm: ConfirmSpec = Field(default_factory=ConfirmSpec)
    windows: WindowSpec | None = Field(default_factory=WindowSpec)
    dose: dict[str, DoseSpec] = Field(default_factory=dict, description="intervention name -> the field and values")
    budget: Budget = Field(default_factory=Budget)
    evals: Literal["question", "all"] = Field(
        "question", description="what each run evaluates: 'question', the main split's loss and accuracy only "
                                "(no head measures, no per-example losses: training is unchanged and the eval "
                                "work several times smaller); 'all', the base protocol's measures")
    workers: PosCount | None = None
    max_pack: PosCount = 8

    @model_validator(mode="after")
    def _detector_needs_curve(self) -> DiscoverSpec:
        w = self.windows
        if w is not None and w.relative_to != "crossing" and self.question.margin_evals < DETECTOR_EVALS:
            raise SpecError("windows.relative_to", f"{w.relative_to} reads the reference's loss drop with the phase "
                            f"detector, which needs the curve past the crossing, so question.margin_evals must be at "
                            f"least {DETECTOR_EVALS} (got {self.question.margin_evals}).",
                            f"set question.margin_evals: {DETECTOR_EVALS}, or windows.relative_to: crossing.")
        unknown = sorted(set(self.dose) - set(self.interventions))
        if unknown:
            raise SpecError(f"dose.{unknown[0]}", f"'{unknown[0]}' is not one of the interventions "
                            f"({', '.join(self.interventions)}).", "name an intervention of this file, or remove it.")
        return self


def load(path: str | Path) -> DiscoverSpec:
    """The discover file, validated whole: its schema, and every run its screen and dose would
    make (each condition's protocol), so a bad intervention is refused before anything is
    written; errors name the file and the discover field."""
    from optolab.protocol.loader import read_spec

    spec, lines = read_spec(path, "discover file", DiscoverSpec)
    try:
        _check_runs(spec, str((Path(path).parent / spec.protocol).resolve()))
    except OptolabError as e:
        if e.source:
            raise
        field = (e.field or "").removeprefix("design.")  # the screen design's fields are this file's
        raise OptolabError(e.message, field=field, fix=e.fix).located(str(path), lines) from None
    return spec


def _check_runs(spec: DiscoverSpec, base: str) -> None:
    """Validate the reference, every screen condition and every dose value as the stages' runs."""
    import re

    from optolab.experiments.designs import _put
    from optolab.protocol.loader import load_protocol, validate_protocol

    conds = screen_conditions(spec, base)
    data = _as_run(load_protocol(base), run_set(spec, base)).resolved()  # the reference, validated
    n_base = len(data["clamps"])
    runs = list(conds)
    for why, dose in spec.dose.items():  # as stage_dose makes them, on the intervention's first target
        first = next(((n, c) for n, c, w in conds if w == why), None)
        for v in dose.values if first else []:
            runs.append((f"{first[0]} at {dose.field} {v:g}", [_put(c, dose.field, v) for c in first[1]], why))
    for name, clamps, why in runs:
        try:
            validate_protocol({**data, "clamps": [*data["clamps"], *clamps]})
        except OptolabError as e:
            hit = re.fullmatch(r"clamps\.(\d+)(?:\.(.*))?", e.field or "")
            field = f"interventions.{why}" + (f".{hit.group(2)}" if hit and hit.group(2) else "") \
                if hit and int(hit.group(1)) >= n_base else e.field
            raise OptolabError(f"{e.message} (condition '{name}')", field=field,
                               fix=e.fix or "check the intervention.") from None


# --- the stages' sweeps ----------------------------------------------------------------------

class Ctx:
    """What every stage needs: the spec, its file, the output folder and the record."""

    def __init__(self, spec: DiscoverSpec, path: Path, out: Path, workers: int | None, progress=print) -> None:
        self.spec, self.path, self.out = spec, path, out
        self.base = str((path.parent / spec.protocol).resolve())
        self.set = run_set(spec, self.base)
        self.workers = workers or spec.workers
        self.say = progress
        self.record_path = out / "discover.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {"stages": {}}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.record_path, json.dumps(self.record, indent=2, default=str))

    def stage_dir(self, k: int, stage: str) -> Path:
        return self.out / f"{k}_{stage}"


def run_set(spec: DiscoverSpec, base: str) -> dict[str, Any]:
    """The dotted overrides of every stage's runs: with ``evals: question``, only the main
    split's loss is evaluated (every measure off, no per-example losses); the file's ``set`` last,
    so a measure it switches on stays on."""
    if spec.evals == "all":
        return dict(spec.set)
    from optolab.measures.registry import measures
    from optolab.protocol.loader import load_protocol
    from optolab.tasks import make_task

    main = make_task(load_protocol(base).task).main_split
    lean = {"measures.splits": [main], "measures.per_example": False, **{f"measures.{n}": False for n in measures()}}
    return {**lean, **spec.set}


def screen_conditions(spec: DiscoverSpec, base: str) -> list[tuple[str, list[dict], str]]:
    """``(name, clamps, intervention)`` of every target × intervention (the screen design's)."""
    from optolab.experiments import designs
    from optolab.protocol.loader import load_protocol

    p = load_protocol(base)
    for dotted, value in spec.set.items():
        if dotted in ("model.n_layers", "model.n_heads", "train.steps", "train.batch_size"):
            raise OptolabError(f"set.{dotted} changes the model or budget the screen is laid out on.",
                               field=f"set.{dotted}", fix="change it in the base protocol instead.")
    screen = designs.parse({"kind": "screen", "targets": spec.targets.model_dump(exclude_none=True),
                            "interventions": spec.interventions}, None, None)
    shape = designs.Shape(p.model.n_layers, p.model.n_heads, p.train.total_steps, p.train.batch_size)
    return [(c.name, c.clamps, c.origins[0].rsplit(".", 1)[1]) for c in screen.conditions(shape, None, None)]


def write_sweep(ctx: Ctx, file: Path, conditions: list[dict], stop: dict) -> None:
    data = {"name": file.stem, "protocol": ctx.base, "seeds": [0], "set": ctx.set,
            "conditions": conditions, "stop_at_answer": stop, "run_figures": False}
    if any(c["name"] == REFERENCE for c in conditions):
        data["reference"] = REFERENCE
    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file, yaml.safe_dump(data, sort_keys=False))


def run_round(ctx: Ctx, file: Path, sweep_dir: Path) -> None:
    from optolab.experiments.sweep import run_sweep

    status = run_sweep(file, sweep_dir, workers=ctx.workers, max_pack=ctx.spec.max_pack, max_runs=100_000)
    failed = {rid: v for rid, v in status.items() if v.startswith("failed") and "diverged earlier" not in v}
    if failed:
        rid, why = next(iter(failed.items()))
        raise OptolabError(f"{len(failed)} run(s) of {sweep_dir.name} failed ({rid}: {why}).", field="--out",
                           fix="fix the cause and run the same command again: finished runs are kept.")


def sweep_round(ctx: Ctx, file: Path, listed: list[dict], stop: dict | bool, sweep_dir: Path,
                message: str) -> tuple[dict, dict]:
    """Write ``listed`` as the sweep ``file``, say ``message``, run it into ``sweep_dir``; the
    crossing times and the censored runs' last evals of everything in that folder."""
    write_sweep(ctx, file, listed, stop)
    ctx.say(message)
    run_round(ctx, file, sweep_dir)
    loss = ctx.spec.question.loss
    return times(sweep_dir, loss), censored(sweep_dir, loss)


def crossings(sweep_dir: Path, loss: float, interpolate: bool = True) -> dict[str, dict[int, Any]]:
    """``{condition: {seed: Crossing}}`` of a stage's finished runs: the main loss's first
    crossing of ``loss`` (interpolated; else the first eval at or below it), or where a run that
    never crossed was censored."""
    import pandas as pd

    from optolab.experiments.stats import crossing_time

    meta = sweep_dir / "sweep.json"
    if not meta.is_file():
        return {}
    out: dict[str, dict[int, Any]] = {}
    for rid, info in json.loads(meta.read_text())["runs"].items():
        summary = sweep_dir / rid / "summary.json"
        if not summary.is_file():
            continue
        main = json.loads(summary.read_text())["main_split"]
        m = pd.read_parquet(sweep_dir / rid / "metrics.parquet")
        curve = m[(m.split == main) & (m.metric == "loss")].sort_values("step")
        out.setdefault(info["condition"], {})[info["seed"]] = crossing_time(
            curve.sequences.to_numpy(), curve.value.to_numpy(), loss, interpolate=interpolate)
    return out


def times(sweep_dir: Path, loss: float) -> dict[str, dict[int, float | None]]:
    """``{condition: {seed: time}}`` (``None`` = never crossed by its last eval)."""
    return {c: {s: x.time for s, x in v.items()} for c, v in crossings(sweep_dir, loss).items()}


def censored(sweep_dir: Path, loss: float) -> dict[str, dict[int, float | None]]:
    """``{condition: {seed: last eval}}`` of runs that never crossed (stopped at the cap or the budget)."""
    return {c: {s: x.censored_at for s, x in v.items() if x.time is None} for c, v in crossings(sweep_dir, loss).items()}


def compute_s(sweep_dir: Path) -> float:
    """CPU-seconds of a stage's runs (:func:`optolab.experiments.cost.sweep_cpu_s`)."""
    from optolab.experiments.cost import sweep_cpu_s

    return sweep_cpu_s(sweep_dir)


def judge(cond: dict, ref: dict, margin: float, level: float = 0.95, cond_censored: dict | None = None,
          ref_censored: dict | None = None, alpha_look: float | None = None) -> dict:
    """One condition's paired ratio against the reference (censored pairs bounded at the runs'
    last evals: :func:`optolab.experiments.stats.paired_effect`), its verdict and signed-rank
    p-value. ``direction``: from the median, or from its bounds when censoring reaches it."""
    from optolab.experiments import sequential, stats

    e = stats.paired_effect(cond, ref, kind="ratio", level=level, cond_censored_at=cond_censored,
                            ref_censored_at=ref_censored)
    low, high = e.get("effect_low", e["effect"]), e.get("effect_high", e["effect"])
    point = e["effect"]
    if point is None:  # censoring reaches the median: judge by the bound nearer 1 (1 where it straddles 1)
        point = low if low is not None and low > 1 else high if high is not None and high < 1 else 1.0
    p = sequential.condition_p(e["per_seed"])
    return {"ratio": e["effect"], "bounds": [low, high], "point": point, "ci": [e["ci_low"], e["ci_high"]],
            "n_pairs": e["n_pairs"], "n_censored": e["n_censored"], "verdict": sequential.verdict(e, margin, p, alpha_look),
            "p": p,
            "direction": None if not e["n_pairs"] else ("delay" if point >= 1 else "speedup")}


def sequential_stage(ctx: Ctx, k: int, stage: str, conds: dict[str, list[dict]], rule: SeedRule,
                     first_seed: int, cap: int | None) -> dict:
    """Sequential rounds of ``conds`` (name -> clamps) against the reference; the stage's record."""
    from optolab.experiments import sequential

    sweep_dir = ctx.stage_dir(k, stage)
    seeds = {n: list(range(first_seed, first_seed + rule.start)) for n in conds}
    verdicts: dict[str, dict] = {}
    budget_reached = False
    alpha_look = sequential.alpha_per_look(ctx.spec.alpha, rule.start, rule.add, rule.max)
    for r in range(1, 1 + math.ceil((rule.max - rule.start) / rule.add) + 1):
        ref_seeds = sorted({s for v in seeds.values() for s in v})
        listed = [{"name": REFERENCE, "seeds": ref_seeds}] + [
            {"name": n, "clamps": conds[n], "seeds": seeds[n]} for n in conds]
        stop: dict | bool = ctx.spec.question.model_dump()  # the screen's first round: capped relative to its reference
        if cap is not None:  # later rounds and stages: an absolute cap from the screen's reference, so nothing waits
            for c in listed:
                c["set"] = {"train.stop": _stop_rule(ctx, None if c["name"] == REFERENCE else cap)}
            stop = False
        t, c = sweep_round(ctx, ctx.out / f"{k}_{stage}.round{r}.yaml", listed, stop, sweep_dir,
                           f"[discover] {stage} round {r}: {sum(map(len, seeds.values())) + len(ref_seeds)} runs "
                           f"({len(conds)} conditions)")
        if cap is None:  # later rounds: capped at this round's reference, so their runs need not wait for its new seeds
            from optolab.experiments.answering import cap_sequences

            cap = cap_sequences(ctx.spec.question, list(t.get(REFERENCE, {}).values()))
        verdicts = {n: judge(t.get(n, {}), t.get(REFERENCE, {}), ctx.spec.margin, cond_censored=c.get(n),
                             ref_censored=c.get(REFERENCE), alpha_look=alpha_look) for n in conds}
        grown = {n: sequential.next_seeds(seeds[n], verdicts[n]["verdict"], rule.add, rule.max) for n in conds}
        if grown == seeds:
            break
        if _runs_so_far(ctx) + _stage_runs(grown) > ctx.spec.budget.max_runs:
            budget_reached = True
            break
        seeds = grown
    looks = sequential.looks(rule.start, rule.add, rule.max)  # Holm on Bonferroni-over-looks p-values
    survives = sequential.holm({n: min(1.0, looks * v["p"]) for n, v in verdicts.items()}, ctx.spec.alpha)
    for n, v in verdicts.items():
        v.update(holm=survives[n], seeds=len(seeds[n]), at_cap=v["verdict"] == "open" and len(seeds[n]) >= rule.max)
    ref_times = times(sweep_dir, ctx.spec.question.loss).get(REFERENCE, {})
    return {"verdicts": verdicts, "rounds": r, "alpha_look": alpha_look, "runs": _stage_runs(seeds),
            "budget_reached": budget_reached, "reference_times": {str(s): x for s, x in ref_times.items()},
            "cap": cap, "compute_s": compute_s(sweep_dir), "dir": str(sweep_dir)}


def _stage_runs(seeds: dict[str, list[int]]) -> int:
    """Runs of a sequential stage: each condition's seeds and the reference's (their union)."""
    return sum(map(len, seeds.values())) + len({s for v in seeds.values() for s in v})


def _runs_so_far(ctx: Ctx) -> int:
    return sum(int(st.get("runs", 0)) for st in ctx.record["stages"].values())


def _stop_rule(ctx: Ctx, cap: int | None) -> dict:
    q = ctx.spec.question
    return {"metric": "loss", "threshold": q.loss, "direction": "down", "margin_evals": q.margin_evals,
            "cap_sequences": cap}


def _event_time(ctx: Ctx, stage_dir: Path, relative_to: str, ref_seeds: list[int]) -> float | None:
    """The reference's median event time (sequences) in ``stage_dir`` (window_search rules)."""
    from optolab.experiments.stats import median

    if relative_to == "crossing":
        t = times(stage_dir, ctx.spec.question.loss).get(REFERENCE, {})
        return median([t.get(s) for s in ref_seeds if s in t])
    import pandas as pd

    from optolab.measures.phase import detect

    found = []
    meta = json.loads((stage_dir / "sweep.json").read_text())
    for rid, info in meta["runs"].items():
        if info["condition"] != REFERENCE or not (stage_dir / rid / "summary.json").is_file():
            continue
        main = json.loads((stage_dir / rid / "summary.json").read_text())["main_split"]
        m = pd.read_parquet(stage_dir / rid / "metrics.parquet")
        c = m[(m.split == main) & (m.metric == "loss")].sort_values("step")
        pc = detect(c.sequences.to_numpy(), c.value.to_numpy())
        if pc.event is None:
            continue
        before = [e for e in pc.events if e.end <= pc.event.onset]
        found.append(pc.event.onset if relative_to == "drop_onset" else (before[-1].end if before else 0.0))
    return median(found) if found else None


def stage_screen(ctx: Ctx) -> dict:
    conds = {n: clamps for n, clamps, _ in screen_conditions(ctx.spec, ctx.base)}
    return sequential_stage(ctx, 1, "screen", conds, ctx.spec.seeds, 0, None)


def _cap(ctx: Ctx) -> int | None:
    """The cap of the later stages: the one the screen's later rounds had (its first round's
    reference); from all its reference times for a record written before it was kept."""
    from optolab.experiments.answering import cap_sequences

    screen = ctx.record["stages"]["screen"]
    if "cap" in screen:
        return screen["cap"]
    return cap_sequences(ctx.spec.question, list(screen["reference_times"].values()))


def stage_confirm(ctx: Ctx) -> dict:
    screen = ctx.record["stages"]["screen"]["verdicts"]
    hits = [n for n, v in screen.items() if v["verdict"] == "effect"]
    if not hits:
        return {"verdicts": {}, "skipped": "the screen found no effect", "compute_s": 0.0}
    clamps = {n: c for n, c, _ in screen_conditions(ctx.spec, ctx.base)}
    out = sequential_stage(ctx, 2, "confirm", {n: clamps[n] for n in hits}, ctx.spec.confirm, ctx.spec.confirm.offset,
                           _cap(ctx))
    for n, v in out["verdicts"].items():
        v["confirmed"] = v["verdict"] == "effect" and v["direction"] == screen[n]["direction"]
    return out


def _confirmed(ctx: Ctx) -> list[tuple[str, dict]]:
    """Confirmed conditions, strongest (largest |log ratio|; a censored median counts as largest) first."""
    got = ctx.record["stages"].get("confirm", {}).get("verdicts", {})
    strength = lambda v: abs(math.log(v["point"])) if v.get("point") else math.inf  # noqa: E731
    return sorted(((n, v) for n, v in got.items() if v.get("confirmed")), key=lambda nv: -strength(nv[1]))


def stage_windows(ctx: Ctx) -> dict:
    from optolab.experiments import window_search

    w = ctx.spec.windows
    picks = _confirmed(ctx)[: w.top] if w is not None else []
    if not picks:
        return {"searches": {}, "skipped": "no confirmed effect" if w is not None else "windows: null",
                "compute_s": 0.0}
    confirm_dir = ctx.stage_dir(2, "confirm")
    ref = times(confirm_dir, ctx.spec.question.loss).get(REFERENCE, {})
    ref_cens = censored(confirm_dir, ctx.spec.question.loss).get(REFERENCE, {})
    seeds = sorted(ref)[: w.seeds]
    t_event = _event_time(ctx, confirm_dir, w.relative_to, seeds)
    if t_event is None or t_event <= 0:
        return {"searches": {}, "skipped": f"the reference has no {w.relative_to}", "compute_s": 0.0}
    cap = _cap(ctx)
    from optolab.protocol.loader import load_protocol

    base = load_protocol(ctx.base)
    budget = base.train.total_steps * base.train.batch_size
    hi = max(1.0, min(cap or 3 * t_event, budget) / t_event)  # a window from hi·T on clamps nothing the time sees
    clamps = {n: c for n, c, _ in screen_conditions(ctx.spec, ctx.base)}
    sweep_dir = ctx.stage_dir(3, "windows")
    first = crossings(confirm_dir, ctx.spec.question.loss, interpolate=False)
    searches = {}
    listed: list[dict] = []  # every probe so far: the stage's sweep.json lists them all
    for name, v in picks:
        rounds = iter(range(1, 100))

        def probe(asks: dict, name=name, rounds=rounds) -> dict:
            names, empty = {}, []
            for which, (a, b) in asks.items():
                w_ = window_search.window(a, b, t_event, budget)
                if w_ is None:  # starts after training ends: no clamp, no effect
                    empty.append(which)
                    continue
                cname = f"{name}__{which}_{a:.4g}_{b:.4g}".replace(".", "p")
                names[which] = cname
                windowed = [{**c, "window": w_} for c in clamps[name]]
                if all(c["name"] != cname for c in listed):
                    listed.append({"name": cname, "clamps": windowed, "seeds": seeds,
                                   "set": {"train.stop": _stop_rule(ctx, cap)}})
            t, cens = {}, {}
            if names:
                t, cens = sweep_round(ctx, ctx.out / f"3_windows.{name}.round{next(rounds)}.yaml", listed, False,
                                      sweep_dir, f"[discover] windows {name}: probing "
                                      f"{', '.join(f'{k} {a:.3g}-{b:.3g} T' for k, (a, b) in asks.items())}")
            return {**{which: 1.0 for which in empty},
                    **{which: judge(t.get(c, {}), {s: ref[s] for s in seeds}, ctx.spec.margin, cond_censored=cens.get(c),
                                    ref_censored=ref_cens)["point"] for which, c in names.items()}}

        # known ends (window_search rules): one batch past the probe seeds' last eval at or below
        # the loss, so the eval that saw the crossing is inside (stop) or before (start) the window
        bs = base.train.batch_size
        searches[name] = window_search.search(
            probe, v["direction"], w.effect, hi, w.resolution,
            start_fails=_latest(first.get(REFERENCE, {}), seeds, bs, t_event),
            stop_holds=_latest(first.get(name, {}), seeds, bs, t_event))
    return {"searches": searches, "t_event": t_event, "relative_to": w.relative_to, "seeds": seeds,
            "runs": len(listed) * len(seeds),
            "compute_s": compute_s(sweep_dir), "dir": str(sweep_dir)}


def _latest(first: dict, seeds: list[int], batch: int, t_event: float) -> float | None:
    """``(latest first eval at or below the loss + one batch) / T`` over ``seeds``; None when a
    seed never crossed (or crossed by its first eval) or is missing."""
    got = [first.get(s) for s in seeds]
    if any(x is None or not x.crossed or x.left for x in got):
        return None
    return (max(x.time for x in got) + batch) / t_event


def stage_dose(ctx: Ctx) -> dict:
    from optolab.experiments.designs import _put

    by_name = {n: (c, i) for n, c, i in screen_conditions(ctx.spec, ctx.base)}
    pick = next((n for n, _ in _confirmed(ctx) if by_name[n][1] in ctx.spec.dose), None)
    if pick is None:
        return {"doses": {}, "skipped": "no confirmed effect with a dose entry", "compute_s": 0.0}
    d = ctx.spec.dose[by_name[pick][1]]
    confirm_dir = ctx.stage_dir(2, "confirm")
    ref = times(confirm_dir, ctx.spec.question.loss).get(REFERENCE, {})
    seeds = sorted(ref)[: ctx.spec.confirm.start]
    listed = [{"name": f"{pick}__dose_{v:g}".replace(".", "p"), "clamps": [_put(c, d.field, v) for c in by_name[pick][0]],
               "seeds": seeds, "set": {"train.stop": _stop_rule(ctx, _cap(ctx))}} for v in d.values]
    sweep_dir = ctx.stage_dir(4, "dose")
    t, cens = sweep_round(ctx, ctx.out / "4_dose.yaml", listed, False, sweep_dir,
                          f"[discover] dose of {pick}: {d.field} in {d.values}, {len(listed) * len(seeds)} runs")
    ref_cens = censored(confirm_dir, ctx.spec.question.loss).get(REFERENCE, {})
    doses = {f"{v:g}": judge(t.get(c["name"], {}), {s: ref[s] for s in seeds}, ctx.spec.margin,
                             cond_censored=cens.get(c["name"]), ref_censored=ref_cens)
             for v, c in zip(d.values, listed)}
    return {"condition": pick, "field": d.field, "doses": doses, "runs": len(listed) * len(seeds),
            "compute_s": compute_s(sweep_dir),
            "dir": str(sweep_dir)}


RUNNERS = {"screen": stage_screen, "confirm": stage_confirm, "windows": stage_windows, "dose": stage_dose}


def run_discover(path: str | Path, out: str | Path, *, workers: int | None = None, stop_after: str | None = None,
                 progress=print) -> dict:
    """Run (or resume) every stage not yet recorded; write ``formation_map.md``. ``stop_after``
    ends after that stage (tests of resumption)."""
    import time

    from optolab.core.lock import DirLock
    from optolab.experiments.formation_map import write_map

    spec = load(path)
    out = Path(out)
    _same_discovery(spec, out / "discover.json")
    out.mkdir(parents=True, exist_ok=True)
    lock = DirLock(out, "discover")
    try:
        ctx = Ctx(spec, Path(path), out, workers, progress)
        ctx.record.update(name=spec.name, source=str(Path(path).resolve()), spec=spec.model_dump(mode="json"))
        ctx.save()  # the spec first: an interrupted first stage still belongs to this file
        for stage in STAGES:
            if stage in ctx.record["stages"]:
                progress(f"[discover] {stage}: recorded, skipped")
                continue
            t0 = time.monotonic()
            result = RUNNERS[stage](ctx)
            result["wall_s"] = time.monotonic() - t0
            ctx.record["stages"][stage] = result
            ctx.save()
            if stage == stop_after:
                break
        ctx.save()
        write_map(ctx.record, spec, out)
    finally:
        lock.release()
    return ctx.record


def _same_discovery(spec: DiscoverSpec, record: Path) -> None:
    """Refuse an ``--out`` that holds another discovery (a record of a different spec): its
    recorded stages would be read as this file's answers."""
    if not record.is_file():
        return
    from optolab.core.files import read_json_object

    old = read_json_object(record, "delete discover.json to redo every stage's verdicts from its runs, or choose "
                                   "another --out.").get("spec")
    if old is None:  # recorded before the spec was kept: its stages are taken as they are
        return
    new = spec.model_dump(mode="json")
    same = {"name", "workers"}  # a renamed file, or more workers, asks the same questions
    differ = sorted(k for k in (set(old) | set(new)) - same if old.get(k) != new.get(k))
    if differ:
        raise OptolabError(f"'{record.parent}' holds a discovery of another file (fields differ: {', '.join(differ)}); "
                           "its recorded stages are not this file's answers.", field="--out",
                           fix="choose another --out, or run the file that made it.")


def plan(path: str | Path, workers: int | None = None) -> list[str]:
    """``--dry-run``: the stages, their run counts (first round and at most) and estimated
    CPU-minutes (:mod:`optolab.experiments.cost`, calibrated now on the base protocol as the
    stages run it: their evals, ``set`` and packing, compiled where ``compile: auto`` would; runs
    counted at their full budget, an upper bound since runs stop at their answer)."""
    import os

    from optolab.core.device import decide_compile, resolve_device
    from optolab.experiments.cost import calibrate, job_seconds
    from optolab.protocol.loader import load_protocol

    spec = load(path)
    base = str((Path(path).parent / spec.protocol).resolve())
    conds = screen_conditions(spec, base)
    n = len(conds)
    s, c = spec.seeds, spec.confirm
    w = spec.windows
    rounds = math.ceil(math.log2(spec.question.cap / w.resolution)) if w is not None else 0
    stages = [("screen", (n + 1) * s.start, (n + 1) * s.max, f"{n} conditions + reference, rounds of +{s.add} seeds"),
              ("confirm", 0, (n + 1) * c.max, "the screen's effects on fresh seeds (0 if none)"),
              ("windows", 0, (w.top if w else 0) * 2 * rounds * (w.seeds if w else 0),
               f"bisection, about {rounds} rounds per boundary" if w else "off"),
              ("dose", 0, max((len(d.values) for d in spec.dose.values()), default=0) * c.start, "the strongest")]
    p = _as_run(load_protocol(base), run_set(spec, base))  # what the stages' runs are: their evals and settings
    model = calibrate(p)
    workers = workers or spec.workers or os.cpu_count() or 1
    compiled = decide_compile(p.train, resolve_device(p.train.device), members=spec.max_pack)
    per_run = job_seconds(model, [p] * spec.max_pack, compiled) / spec.max_pack
    lines = [f"discover {spec.name}: base {base}, question: loss {spec.question.loss}",
             f"cost model (calibrated now, on the runs' own evals: {spec.evals}): {model.a * 1e3:.2f} + "
             f"{model.b * 1e3:.2f}·k ms per ensemble step of k, {model.eval_s * 1e3:.0f} ms per eval; one run at its "
             f"full budget in an ensemble of {spec.max_pack}: {per_run / 60:.2f} CPU-min "
             f"({'compiled' if compiled else 'eager'})", "stage     first round   at most   CPU-min (first round .. at most)"]
    for name, first, most, note in stages:
        lines.append(f"{name:<9} {first:>11} {most:>9}   {first * per_run / 60:6.1f} .. {most * per_run / 60:6.1f}   {note}")
    lo = stages[0][1] * per_run / 60
    hi = sum(st[2] for st in stages) * per_run / 60
    lines.append(f"total: {lo:.1f} .. {hi:.1f} CPU-min at full budgets ({lo / workers:.1f} .. {hi / workers:.1f} min "
                 f"wall on {workers} worker(s)); runs stop at their answer, so expect a fraction of this (the "
                 "quickstart's runs train 17-33 % of their budget: 18-26 CPU-min measured).")
    return lines


def _as_run(protocol, overrides: dict[str, Any]):
    """``protocol`` with the stages' dotted overrides applied, validated."""
    from optolab.experiments.sweep import _set
    from optolab.protocol.loader import validate_protocol

    data = protocol.resolved()
    for dotted, value in overrides.items():
        _set(data, dotted, value)
    return validate_protocol(data)
