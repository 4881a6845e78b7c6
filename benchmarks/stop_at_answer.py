"""Stop at the answer leaves the times it answers unchanged: one sweep trained twice, with
``stop_at_answer`` off (full budgets) and on, side by side; per run the interpolated time to
loss 0.5, its difference, and the compute of each (CPU-minutes: per job, the longest member's
wall time). Also the cost model's estimate of the full-budget sweep against what it took.

  python benchmarks/stop_at_answer.py                                  # a small T4-like sweep on the quickstart
  python benchmarks/stop_at_answer.py --sweep protocols/sweeps/t4_fig5b.yaml --out results/stop_t4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SMALL = {  # T4's shape on the quickstart: the reference, a previous-token head, an ablated head
    "name": "stop_small", "protocol": str(ROOT / "protocols" / "quickstart.yaml"), "seeds": [0, 1],
    "reference": "none", "run_figures": False,
    "conditions": [
        {"name": "none"},
        {"name": "prev_token_L0H2", "clamps": [{"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [2],
                                                 "to": "previous_token"}]},
        {"name": "ablate_L0H2", "clamps": [{"kind": "ablate", "site": "blocks.0.attn.hook_v", "heads": [2]}]}]}


def variant(src: dict, out: Path, stop: bool) -> Path:
    data = {**src, "stop_at_answer": {"loss": 0.5} if stop else False}
    path = out / f"{'on' if stop else 'off'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> int:
    import torch

    from optolab.experiments import discover
    from optolab.experiments.cost import estimate, sweep_cpu_s
    from optolab.experiments.sweep import plan_sweep, run_sweep

    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", help="a sweep file (default: the small quickstart sweep above)")
    ap.add_argument("--out", default="results/stop_at_answer")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        src = yaml.safe_load(Path(args.sweep).read_text())
        src["protocol"] = str((Path(args.sweep).parent / src["protocol"]).resolve())
        for c in src.get("conditions", []):
            if "protocol" in c:
                c["protocol"] = str((Path(args.sweep).parent / c["protocol"]).resolve())
    else:
        src = SMALL
    results = {}
    for stop in (False, True):
        path = variant(src, out, stop)
        d = out / ("on" if stop else "off")
        _, runs, _, jobs, workers = plan_sweep(path, d, workers=args.workers, pack="auto", max_pack=8)
        seconds, _ = estimate(runs, jobs)
        t0 = time.monotonic()
        run_sweep(path, d, workers=args.workers)
        results[stop] = (discover.times(d, 0.5), sweep_cpu_s(d), time.monotonic() - t0, sum(seconds))
    (off, cpu_off, wall_off, est_off), (on, cpu_on, wall_on, est_on) = results[False], results[True]
    print("| condition | seed | t(loss 0.5), full budget | with stop-at-answer | difference |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for cond in off:
        for seed, t in sorted(off[cond].items()):
            u = on.get(cond, {}).get(seed)
            diff = None if t is None or u is None else u - t
            worst = max(worst, abs(diff or 0.0)) if (t is None) == (u is None) else float("inf")
            print(f"| {cond} | {seed} | {t if t is None else f'{t:,.1f}'} | {u if u is None else f'{u:,.1f}'} | "
                  f"{diff if diff is None else f'{diff:.3g}'} |")
    print(f"\nlargest difference: {worst:.3g} sequences; compute: full {cpu_off / 60:.1f} CPU-min ({wall_off / 60:.1f} min "
          f"wall), stop-at-answer {cpu_on / 60:.1f} CPU-min ({wall_on / 60:.1f} min wall), {cpu_off / max(cpu_on, 1e-9):.2f}x "
          f"less; cost model for the full sweep: {est_off / 60:.1f} CPU-min estimated, {cpu_off / 60:.1f} taken "
          f"({(est_off - cpu_off) / max(cpu_off, 1e-9):+.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
