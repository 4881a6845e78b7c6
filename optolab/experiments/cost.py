"""Cost estimates for ``--dry-run``: each job's and the total CPU-minutes, from a cost model
calibrated on this machine in a few seconds.

Rules:
- A job of ``k`` packed runs costs ``steps × step_s(k) + evals × k × eval_s`` (+ ``COMPILE_S``
  when it compiles: once per job, since a packed job's conditions and their windows share one
  training graph and one eval graph, :mod:`optolab.training.compiled`), where ``step_s(k) = a + b·k`` (an ensemble's step grows
  linearly with its members: ``vmap`` batches every op) and ``eval_s`` is one member's eval.
- Calibration (:func:`calibrate`): eager solo runs and eager ensembles of
  ``CALIBRATION_MEMBERS`` of the job's protocol, each at two lengths (``CALIBRATION_STEPS``),
  with an eval at both ends, in a temporary folder. Per-step times come from the *difference*
  of the two lengths' wall times: what a run pays once (building the task and model, the first
  pass's lazy set-up, checkpoints, files) cancels, where a single short run counted it as steps
  (at 24 steps that made the first key's estimate several times too high). Times are this
  process's CPU time, not wall time: a calibration on a busy machine measures the job, not the
  other processes (the eval times, recorded as wall time, are scaled by the run's CPU/wall).
  ``eval_s`` from the eval times. Once per distinct :func:`~optolab.training.ensemble.pack_key`.
- A compiled job's steps are taken as :data:`COMPILED_SPEEDUP` times faster than eager, its
  compile as :data:`COMPILE_S` seconds (the middle of what ``docs/speed.md`` measured); these
  two are the model's assumptions, not calibrated here. Charging the compile per condition (as
  before windows became graph inputs) put T4's estimate at +24 % (docs/results.md#cost-model-error).
- ``steps`` is the budget, or with ``train.stop`` and a known reference crossing the cap (a run
  cannot go past it); a run that stops at its answer costs less, so with stop-at-answer the
  estimate is an upper bound and says so. CPU-minutes count one core per worker process.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CALIBRATION_STEPS = (8, 32)
CALIBRATION_MEMBERS = 4
COMPILED_SPEEDUP = 3.0
COMPILE_S = 40.0


@dataclass(frozen=True)
class CostModel:
    a: float  # seconds per step, fixed part
    b: float  # seconds per step per member
    eval_s: float  # seconds per eval per member

    def step_s(self, k: int) -> float:
        return max(self.a + self.b * k, 1e-6)


def _squeeze(node, total: int, batch_size: int, steps: int) -> None:
    """Every ``window`` in ``node`` (clamps, a ramp's inner clamp, data phases) mapped from the
    ``total``-step run onto a ``steps``-step one in proportion, so that a window late in training
    still acts (and costs) in the short calibration run instead of starting past its end."""
    if isinstance(node, list):
        for item in node:
            _squeeze(item, total, batch_size, steps)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "window" and isinstance(value, dict) and "start" in value:
            per = batch_size if value.get("unit", "sequences") == "sequences" else 1
            start = min(int(value["start"] / per * steps / total), steps - 1)
            stop = value.get("stop")
            stop = None if stop is None else min(max(-(-int(stop / per * steps) // total), start + 1), steps)
            node[key] = {"start": start, "stop": stop, "unit": "steps"}
        else:
            _squeeze(value, total, batch_size, steps)


def _short(protocol, steps: int, name: str, seed: int):
    from optolab.protocol.loader import validate_protocol

    data = copy.deepcopy(protocol.resolved())
    _squeeze(data, protocol.train.total_steps, protocol.train.batch_size, steps)
    data["train"].update(steps=steps, sequences=None, compile=False, device="cpu", stop=None, track=[])
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": steps}}
    data["measures"]["schedule"] = {"unit": "steps", "every": steps}
    data["measures"]["per_example"] = False
    data.update(name=name, seeds={**data["seeds"], "init": seed, "data": seed})
    return validate_protocol(data)


def calibrate(protocol) -> CostModel:
    """Time a short solo run and a short ensemble of ``protocol`` (module rules)."""
    import json

    import torch

    from optolab.training.ensemble import train_ensemble, why_not_packable
    from optolab.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    short, long = CALIBRATION_STEPS
    k = CALIBRATION_MEMBERS
    packable = why_not_packable(protocol) is None

    def timed(n: int, members: int, tmp: Path) -> tuple[float, float]:
        """Wall seconds of ``n`` steps (evals taken out) and seconds per member-eval."""
        outs = [tmp / f"n{n}_k{members}_{i}" for i in range(members)]
        t1, c1 = time.perf_counter(), time.process_time()
        if members == 1:
            train(_short(protocol, n, f"cal{n}", 0), outs[0], progress=False)
        else:
            train_ensemble([_short(protocol, n, f"cal{n}_{members}_{i}", i) for i in range(members)], outs)
        wall, cpu = time.perf_counter() - t1, time.process_time() - c1
        segs = [json.loads((o / "meta.json").read_text())["segments"][-1] for o in outs]
        evals = sum(s["eval_time_s"] for s in segs) * min(1.0, cpu / max(wall, 1e-9))  # wall -> this process's CPU
        return cpu - evals, evals / (2 * members)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            (w_short, _), (w_long, eval_s) = timed(short, 1, Path(tmp)), timed(long, 1, Path(tmp))
            step1 = max(w_long - w_short, 1e-6) / (long - short)
            if not packable:
                return CostModel(0.0, step1, eval_s)
            (k_short, _), (k_long, _) = timed(short, k, Path(tmp)), timed(long, k, Path(tmp))
            stepk = max(k_long - k_short, 1e-6) / (long - short)
    finally:
        torch.set_num_threads(threads)
    b = max((stepk - step1) / (k - 1), 1e-6)
    return CostModel(max(step1 - b, 0.0), b, eval_s)


def job_seconds(model: CostModel, protocols: list, compiled: bool, n_programs: int = 1) -> float:
    """One job's estimated seconds (module rules)."""
    p = protocols[0]
    k = len(protocols)
    steps = p.train.total_steps
    cap = p.train.stop.cap_sequences if p.train.stop is not None else None
    if cap is not None:
        steps = min(steps, -(-cap // p.train.batch_size))
    evals = sum(1 for s in p.eval_steps() if s <= steps)
    step_s = model.step_s(k) / (COMPILED_SPEEDUP if compiled else 1.0)
    return steps * step_s + evals * k * model.eval_s + (COMPILE_S * n_programs if compiled else 0.0)


def estimate(runs: dict, jobs: list[list[str]], models: dict | None = None) -> tuple[list[float], dict]:
    """Each job's estimated seconds, calibrating once per pack key (``models`` is reused/filled)."""
    from optolab.core.device import decide_compile, resolve_device
    from optolab.training.ensemble import pack_key

    models = {} if models is None else models
    out = []
    for job in jobs:
        protocols = [runs[rid].protocol for rid in job]
        key = pack_key(protocols[0])
        if key not in models:
            models[key] = calibrate(protocols[0])
        compiled = decide_compile(protocols[0].train, resolve_device(protocols[0].train.device), members=len(job))
        out.append(job_seconds(models[key], protocols, compiled))
    return out, models


def sweep_cpu_s(sweep_dir: Path) -> float:
    """CPU-seconds a sweep directory's runs took: per job (``sweep.json``'s invocations), the
    longest member's ``meta.json`` wall time (members of an ensemble train in one process, and
    each member's wall time spans the whole job); each run counted in its last job only."""
    import json

    sweep_dir = Path(sweep_dir)
    meta = sweep_dir / "sweep.json"
    if not meta.is_file():
        return 0.0
    last_job: dict[str, int] = {}
    jobs: list[list[str]] = []
    for inv in json.loads(meta.read_text()).get("invocations", []):
        for job in inv.get("jobs", []):
            jobs.append(job)
            for rid in job:
                last_job[rid] = len(jobs) - 1
    total = 0.0
    for j, job in enumerate(jobs):
        walls = []
        for rid in job:
            if last_job.get(rid) != j:
                continue
            try:
                walls.append(float(json.loads((sweep_dir / rid / "meta.json").read_text()).get("wall_time_s", 0.0)))
            except (OSError, ValueError):
                pass
        total += max(walls, default=0.0)
    return total


def makespan(seconds: list[float], workers: int) -> float:
    """Wall seconds of jobs on ``workers`` processes, longest first to the least loaded (as the pool takes them)."""
    loads = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads)
