"""What a window scan costs to compile: graphs built and wall time for one packed ensemble.

A window scan's conditions are one clamp in different training windows (``apply_at: train``, as
``optolab.experiments.designs`` makes them). This trains such a scan as one compiled ensemble:
``--windows`` conditions of a previous-token pattern clamp, each in its own window of
``--steps / --windows`` steps, one seed each, evals every 10 steps, the tiny fewshot config of
the tests. Each repeat runs in a fresh process with an empty compiler cache (cold: what a sweep
worker's first job pays). It prints the graphs torch.compile built (dynamo's ``unique_graphs``)
and the wall time of ``train_ensemble``. ``--root`` runs another checkout's optolab (a before).
Several ``--root`` take turns, so a before and an after share the machine's state. One torch
thread; nothing is kept.

    .venv/bin/python benchmarks/window_compile.py [--windows 4] [--steps 40] [--repeats 3] [--root DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLAMP = {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token", "apply_at": "train"}


def _child(windows: int, steps: int, out: str) -> None:
    import torch
    from torch._dynamo.utils import counters

    from optolab.protocol.loader import validate_protocol
    from optolab.training.ensemble import train_ensemble

    torch.set_num_threads(1)
    length = steps // windows
    protocols = []
    for k in range(windows):
        window = {"start": k * length, "stop": (k + 1) * length, "unit": "steps"}
        protocols.append(validate_protocol({
            "name": f"win{k}", "seeds": {"init": k, "data": k, "eval": 1},
            "task": {"kind": "fewshot", "dim": 32, "n_train_classes": 10, "n_test_classes": 10},
            "model": {"n_layers": 2, "n_heads": 4, "d_model": 16},
            "train": {"lr": 1e-3, "batch_size": 16, "steps": steps, "compile": True,
                      "checkpoints": {"schedule": {"unit": "steps", "every": steps}}},
            "measures": {"schedule": {"unit": "steps", "every": 10}, "eval_sequences": 50},
            "clamps": [{**CLAMP, "window": window}]}))
    counters.clear()
    t = time.perf_counter()
    train_ensemble(protocols, [Path(out) / p.name for p in protocols])
    wall = time.perf_counter() - t
    print(json.dumps({"wall": wall, "graphs": counters["stats"]["unique_graphs"]}))


def _run(windows: int, steps: int, root: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "PYTHONPATH": str(root)}
        got = subprocess.run([sys.executable, __file__, "--child", str(windows), str(steps), str(Path(tmp) / "runs")],
                             capture_output=True, text=True, env=env, check=True)
        return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, action="append", help="a checkout whose optolab runs (default: this one)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        windows, steps, out = args.child
        _child(int(windows), int(steps), out)
        return
    roots = args.root or [ROOT]
    runs: dict[Path, list[dict]] = {r: [] for r in roots}
    for _ in range(args.repeats):
        for root in roots:  # in turns
            runs[root].append(_run(args.windows, args.steps, root))
    for root, got in runs.items():
        walls = [r["wall"] for r in got]
        print(f"{root}: {args.windows} windows, {args.steps} steps: graphs {sorted({r['graphs'] for r in got})}, "
              f"wall median {statistics.median(walls):.1f} s (runs {', '.join(f'{w:.1f}' for w in walls)})")


if __name__ == "__main__":
    main()
