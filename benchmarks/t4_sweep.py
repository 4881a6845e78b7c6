"""Wall time of the T4 sweep (ANCHORS T4: 6 Fig 5b conditions × 3 seeds × 6e5 sequences), run as
a user would: ``optolab sweep protocols/sweeps/t4_fig5b.yaml`` with two workers, packed into seed
ensembles, compiled (the sweep file sets ``train.compile``), into a temporary directory.

Prints the wall time, the peak RSS of the largest worker, and each condition's median time to
loss 0.5 (a check that the fast run still reproduces T4; nothing is kept). Target (issue 6):
<= 5 minutes on this 2-core machine. Takes about as long as it measures, so ``make bench`` leaves
it out: ``make bench-t4``.

    .venv/bin/python benchmarks/t4_sweep.py [--workers 2] [--cold] [-- extra sweep flags, e.g. --pack off]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="an empty compiler cache (what a first sweep pays)")
    ap.add_argument("extra", nargs="*", help="more `optolab sweep` flags (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t4"
        cmd = [sys.executable, "-m", "optolab", "sweep", str(ROOT / "protocols" / "sweeps" / "t4_fig5b.yaml"),
               "--out", str(out), "--workers", str(args.workers), *args.extra]
        t = time.perf_counter()
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")} if args.cold else None
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t
        jobs = json.loads((out / "sweep.json").read_text())["invocations"][-1]["jobs"]
        times = defaultdict(list)
        walls = []  # each job's training loop (its members share it) and its members' evals
        for job in jobs:
            metas = [json.loads((out / rid / "meta.json").read_text()) for rid in job]
            walls.append((job[0].rsplit("_s", 1)[0], len(job), metas[0]["wall_time_s"],
                          sum(seg["eval_time_s"] for meta in metas for seg in meta["segments"])))
        for summary in out.glob("*/summary.json"):
            s = json.loads(summary.read_text())
            reached = s.get("time_to_loss_0.5")
            times[summary.parent.name.rsplit("_s", 1)[0]].append(reached and reached["sequences"])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"T4 sweep (18 runs x 6e5 sequences, {args.workers} workers): {wall / 60:.2f} min wall   [target <= 5 min]")
    print(f"peak RSS of one process: {rss:.0f} MiB")
    print("jobs (runs trained together):", "  ".join("+".join(job) for job in jobs))
    for first, n, wall, evals in walls:
        print(f"  job of {n} ({first}, ...): {wall:.0f} s in the training loop, of which evals {evals:.0f} s")
    for cond, ts in sorted(times.items()):
        found = [t for t in ts if t is not None]
        med = f"{statistics.median(found):.3g}" if found else "not reached"
        print(f"  {cond:<12} time to loss 0.5 (median of {len(ts)}): {med}")


if __name__ == "__main__":
    main()
