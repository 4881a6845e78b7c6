"""Cost estimates for ``--dry-run``: each job's and the total CPU-minutes, from a cost model
calibrated on this machine in a few seconds.

Rules:
- A job of ``k`` packed runs costs ``steps × step_s(k) + evals × k × eval_s`` (+ ``COMPILE_S``
  per clamp program when it compiles), where ``step_s(k) = a + b·k`` (an ensemble's step grows
  linearly with its members: ``vmap`` batches every op) and ``eval_s`` is one member's eval.
- Calibration (:func:`calibrate`): one eager solo run and one eager ensemble of
  ``CALIBRATION_MEMBERS`` of the job's protocol, ``CALIBRATION_STEPS`` steps each with an eval
  at both ends, in a temporary folder; ``a``, ``b`` from their per-step times, ``eval_s`` from
  their eval times. Once per distinct :func:`~optolab.training.ensemble.pack_key`.
- A compiled job's steps are taken as :data:`COMPILED_SPEEDUP` times faster than eager, its
  compile as :data:`COMPILE_S` seconds per program (the middle of what ``docs/speed.md``
  measured); these two are the model's assumptions, not calibrated here.
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

CALIBRATION_STEPS = 24
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


def _short(protocol, steps: int, name: str, seed: int):
    from optolab.protocol.loader import validate_protocol

    data = copy.deepcopy(protocol.resolved())
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
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(_short(protocol, CALIBRATION_STEPS, "cal1", 0), Path(tmp) / "solo", progress=False)
            solo = json.loads((Path(tmp) / "solo" / "meta.json").read_text())["segments"][-1]
            eval_s = solo["eval_time_s"] / 2
            step1 = max(solo["wall_time_s"] - solo["eval_time_s"], 1e-6) / CALIBRATION_STEPS
            k = CALIBRATION_MEMBERS
            if why_not_packable(protocol) is not None:
                return CostModel(0.0, step1, eval_s)
            members = [_short(protocol, CALIBRATION_STEPS, f"cal{k}_{i}", i) for i in range(k)]
            t1 = time.perf_counter()
            train_ensemble(members, [Path(tmp) / f"m{i}" for i in range(k)])
            wall = time.perf_counter() - t1
            evals = sum(json.loads((Path(tmp) / f"m{i}" / "meta.json").read_text())["segments"][-1]["eval_time_s"]
                        for i in range(k))
            stepk = max(wall - evals, 1e-6) / CALIBRATION_STEPS
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
    from optolab.training.ensemble import condition_key, pack_key

    models = {} if models is None else models
    out = []
    for job in jobs:
        protocols = [runs[rid].protocol for rid in job]
        key = pack_key(protocols[0])
        if key not in models:
            models[key] = calibrate(protocols[0])
        compiled = decide_compile(protocols[0].train, resolve_device(protocols[0].train.device), members=len(job))
        out.append(job_seconds(models[key], protocols, compiled, len({condition_key(p) for p in protocols})))
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
