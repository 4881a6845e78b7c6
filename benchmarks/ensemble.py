"""Ensemble throughput: model-steps/s of S members trained as one vmapped model.

Trains the Singh et al. single-head config (``fig5b_none``: one ablation clamp;
``fig5b_prev_token``: one more, a pattern clamp; ``fig5b_layer1``: the three-pass layer-1 clamp;
``mixed``: members cycling over T4's one-pass conditions none, prev_token, match and copy, one
union program) for ``--steps`` steps through
:func:`optolab.training.ensemble.train_ensemble` with S = 1 (the solo trainer), 4, 8, 16, one torch
thread, evals reduced to the first and last step on 8 sequences so that training dominates.
Prints model-steps/s and the speed-up over solo. Nothing is kept on disk.
With ``--compile`` (``train.compile: true``) the rate is the marginal one, S × (steps₂ − steps₁)
/ (wall₂ − wall₁) over two runs of different length, so the one-off compile (reported apart, as
"first-step cost") does not count against throughput; the compiler's on-disk cache is warmed
first, and S = 1 runs 4× as many steps (the startup varies by ~0.5 s). Eager rates are
S × steps / wall.
``--parallel 2`` runs the same measurement in two processes at once (one per core, as a sweep's
two workers do) and adds their rates.
Targets (issue 6): an ensemble of 8 >= 1,500 model-steps/s on this 2-core machine, i.e. >= 750
per core.

    .venv/bin/python benchmarks/ensemble.py [--steps 300] [--sizes 1 4 8 16] [--compile]
        [--threads 1] [--parallel 1]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from optolab.protocol.loader import load_protocol, validate_protocol
from optolab.training.ensemble import train_ensemble
from optolab.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# T4's conditions: the single-head model (an ablation clamp: 7 of 8 layer-1 heads' values zeroed),
# plus a previous-token pattern clamp, plus the three-pass layer-1 clamp
PROTOCOLS = {"none": ("fig5b_none",), "prev_token": ("fig5b_prev_token",), "layer1": ("fig5b_layer1",),
             "mixed": ("fig5b_none", "fig5b_prev_token", "fig5b_match", "fig5b_copy")}


def _base(name: str, steps: int, compiled: bool) -> dict:
    base = load_protocol(ROOT / "protocols" / "singh2024" / f"{name}.yaml").resolved()
    base["train"]["compile"] = compiled
    base["train"].pop("sequences")
    base["train"]["steps"] = steps
    base["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": steps}, "keep": 1}
    base["measures"] = {**base["measures"], "schedule": {"unit": "steps", "every": steps}, "eval_sequences": 8}
    return base


def members(names: str | tuple[str, ...], S: int, steps: int, compiled: bool = False) -> list:
    """S members; with several protocol names, member s takes ``names[s % len(names)]``."""
    names = (names,) if isinstance(names, str) else names
    out = []
    for s in range(S):
        name = names[s % len(names)]
        data = _base(name, steps, compiled)
        data["name"] = f"{name}_m{s}"
        data["seeds"]["init"] = data["seeds"]["data"] = s
        out.append(validate_protocol(data))
    return out


def run(ps: list, tmp: Path) -> float:
    t = time.perf_counter()
    if len(ps) == 1:
        train(ps[0], tmp / "r", progress=False)
    else:
        train_ensemble(ps, [tmp / f"r{i}" for i in range(len(ps))])
    return time.perf_counter() - t


def measure(label: str, S: int, steps: int, compiled: bool) -> tuple[float, str]:
    """(model-steps/s, first-step cost) of one ensemble size (see the module docstring)."""
    name = PROTOCOLS[label]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not compiled:
            return S * steps / run(members(name, S, steps), tmp), ""
        steps *= 4 if S == 1 else 1  # a solo run is short: the startup's ~0.5 s of noise would dominate
        short = max(20, steps // 10)
        run(members(name, S, short, True), tmp / "warm")  # fills the on-disk compile cache
        t1 = run(members(name, S, short, True), tmp / "a")
        t2 = run(members(name, S, short + steps, True), tmp / "b")
        rate = S * steps / (t2 - t1)
        return rate, f"{t1 - S * short / rate:>16.1f}s"


def _worker(args: tuple) -> tuple[float, str]:
    label, S, steps, compiled, threads = args
    torch.set_num_threads(threads)
    return measure(label, S, steps, compiled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=1,
                    help="run the same measurement in N processes at once and add their rates")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports, allocator, nnsight
        train(members("fig5b_prev_token", 1, 20)[0], Path(tmp) / "w", progress=False)
        train_ensemble(members("fig5b_prev_token", 2, 20), [Path(tmp) / "w0", Path(tmp) / "w1"])
    mode = "compiled" if args.compile else "eager"
    print(f"{mode}, {args.threads} thread(s) x {args.parallel} process(es)")
    print(f"{'protocol':<18}{'S':>4}{'model-steps/s':>15}{'vs solo':>9}{'first-step cost':>17}")
    for label in args.protocols:
        solo = None
        for S in args.sizes:
            if args.parallel == 1:
                rate, first = measure(label, S, args.steps, args.compile)
            else:
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(args.parallel) as pool:
                    got = pool.map(_worker, [(label, S, args.steps, args.compile, args.threads)] * args.parallel)
                rate, first = sum(r for r, _ in got), got[0][1]
            solo = solo or rate
            print(f"{label:<18}{S:>4}{rate:>15.0f}{rate / solo:>8.2f}x{first}", flush=True)


if __name__ == "__main__":
    main()
