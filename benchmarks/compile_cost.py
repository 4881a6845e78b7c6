"""What a compile costs and when it pays: the measurements behind ``train.compile: auto``.

For the main config (one pattern clamp, as ``clamp_overhead.py``'s "pattern clamp") and for the
single-head T4 config, trains ``--short`` and ``--long`` steps eagerly and compiled, each in a
fresh process with an empty compiler cache (cold: what a first run pays), evals at the first and
last step only. Each path's wall time is ``fixed + steps × per_step``; two lengths give both, and
the break-even length is ``(fixed_compiled − fixed_eager) / (per_step_eager − per_step_compiled)``.
``optolab.core.device.AUTO_COMPILE_STEPS`` is set above the largest break-even measured,
so ``auto`` never makes a run slower. One torch thread; nothing is kept.

    .venv/bin/python benchmarks/compile_cost.py [--short 300] [--long 3000] [--configs main t4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"main": ("main.yaml", [{"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token"}]),
           "t4": ("fig5b_prev_token.yaml", None)}


def _child(config: str, steps: int, compiled: bool, out: str) -> None:
    import torch

    from optolab.protocol.loader import load_protocol, validate_protocol
    from optolab.training.trainer import train

    torch.set_num_threads(1)
    name, clamps = CONFIGS[config]
    data = load_protocol(ROOT / "protocols" / "singh2024" / name).resolved()
    data["train"].pop("sequences", None)
    data["train"].update(steps=steps, compile=compiled, device="cpu")
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": steps}, "keep": 1}
    data["measures"] = {**data["measures"], "schedule": {"unit": "steps", "every": steps}}
    if clamps is not None:
        data["clamps"] = clamps
    t = time.perf_counter()
    train(validate_protocol(data), out, progress=False)
    print(json.dumps({"wall": time.perf_counter() - t}))


def _wall(config: str, steps: int, compiled: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}  # cold
        got = subprocess.run([sys.executable, __file__, "--child", config, str(steps), str(int(compiled)),
                              str(Path(tmp) / "run")], capture_output=True, text=True, env=env, check=True)
        return json.loads(got.stdout.strip().splitlines()[-1])["wall"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", type=int, default=300)
    ap.add_argument("--long", type=int, default=3000)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        config, steps, compiled, out = args.child
        _child(config, int(steps), bool(int(compiled)), out)
        return
    print(f"{'config':<6} {'path':<9} {'fixed s':>8} {'ms/step':>8} {'steps/s':>8}   break-even")
    for config in args.configs:
        fit = {}
        for compiled in (False, True):
            short, long = _wall(config, args.short, compiled), _wall(config, args.long, compiled)
            per = (long - short) / (args.long - args.short)
            fit[compiled] = (short - args.short * per, per)
        (f_e, s_e), (f_c, s_c) = fit[False], fit[True]
        even = (f_c - f_e) / (s_e - s_c) if s_e > s_c else float("inf")
        for compiled, (f, s) in fit.items():
            tail = f"{even:>10,.0f} steps" if compiled else ""
            print(f"{config:<6} {'compiled' if compiled else 'eager':<9} {f:>8.1f} {s * 1e3:>8.3f} {1 / s:>8.0f}   {tail}")


if __name__ == "__main__":
    main()
