"""Does bfloat16 keep the answers? (issue 33, item 1) — and how far off the cost model is.

Runs three shipped sweeps into ``OUT`` (resumable: finished runs are skipped), each after
printing the ``--dry-run`` cost model's estimate for it, and afterwards the CPU-minutes it took
(:func:`optolab.experiments.cost.sweep_cpu_s`) and the estimate's error:

- ``protocols/sweeps/t1_bf16.yaml``: T1's main run, seeds 0-2, float32 and bf16;
- ``protocols/sweeps/t4_fig5b.yaml`` and ``t4_fig5b_bf16.yaml``: T4's six conditions, seeds 0-2,
  float32 and bf16.

Then the science: every run's time to loss 0.5 and 0.277 (interpolated crossing of the main
loss, :func:`optolab.experiments.stats.crossing_time`) in bf16 beside float32, seed by seed, and
each T4 condition's median ratio to ``none`` in both precisions (the ordering T4 asks for).

    python benchmarks/bf16_science.py --out results/bf16 [--only t1 t4 t4_bf16] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {"t1": "t1_bf16.yaml", "t4": "t4_fig5b.yaml", "t4_bf16": "t4_fig5b_bf16.yaml"}
LOSSES = (0.5, 0.277)


def crossings(sweep_dir: Path) -> dict[tuple[str, int], dict[float, float | None]]:
    """``{(condition, seed): {loss: sequences}}`` of a sweep's finished runs."""
    import pandas as pd

    from optolab.experiments.stats import crossing_time

    out = {}
    for rid, info in json.loads((sweep_dir / "sweep.json").read_text())["runs"].items():
        if not (sweep_dir / rid / "summary.json").is_file():
            continue
        main = json.loads((sweep_dir / rid / "summary.json").read_text())["main_split"]
        m = pd.read_parquet(sweep_dir / rid / "metrics.parquet")
        c = m[(m.split == main) & (m.metric == "loss")].sort_values("step")
        out[(info["condition"], info["seed"])] = {
            x: crossing_time(c.sequences.to_numpy(), c.value.to_numpy(), x).time for x in LOSSES}
    return out


def run(name: str, out: Path, workers: int | None) -> dict:
    from optolab.experiments.cost import estimate, sweep_cpu_s
    from optolab.experiments.sweep import plan_sweep, run_sweep

    file = ROOT / "protocols" / "sweeps" / SWEEPS[name]
    sweep_dir = out / name
    _, runs, status, jobs, w = plan_sweep(file, sweep_dir, workers=workers, pack="auto", max_pack=8)
    est = sum(estimate(runs, jobs)[0]) if not status else None  # a resumed sweep's estimate covers only the rest
    t0 = time.monotonic()
    run_sweep(file, sweep_dir, workers=workers)
    wall = time.monotonic() - t0
    cpu = sweep_cpu_s(sweep_dir)
    line = {"sweep": SWEEPS[name], "estimate_cpu_min": est and est / 60, "cpu_min": cpu / 60, "wall_min": wall / 60}
    if est:
        line["error"] = est / cpu - 1
    print(json.dumps(line), flush=True)
    return line


def fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:,.0f}"


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bf16")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=list(SWEEPS), choices=list(SWEEPS))
    ap.add_argument("--report-only", action="store_true", help="print the tables of OUT's finished sweeps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.report_only:
        costs = json.loads((out / "costs.json").read_text())
    else:
        costs = {name: run(name, out, args.workers) for name in args.only}
        (out / "costs.json").write_text(json.dumps(costs, indent=2))

    print("\n| sweep | estimate (CPU-min) | took (CPU-min) | error | wall (min) |\n|---|---|---|---|---|")
    for c in costs.values():
        e = "—" if c["estimate_cpu_min"] is None else f"{c['estimate_cpu_min']:.1f}"
        err = f"{100 * c['error']:+.0f} %" if "error" in c else "—"
        print(f"| {c['sweep']} | {e} | {c['cpu_min']:.1f} | {err} | {c['wall_min']:.1f} |")

    if (out / "t1" / "sweep.json").is_file():
        t1 = crossings(out / "t1")
        print("\n| T1 seed | fp32 t(0.5) | bf16 t(0.5) | ratio | fp32 t(0.277) | bf16 t(0.277) | ratio |\n|---|---|---|---|---|---|---|")
        for s in sorted({s for _, s in t1}):
            a, b = t1.get(("fp32", s), {}), t1.get(("bf16", s), {})
            cells = []
            for x in LOSSES:
                fa, fb = a.get(x), b.get(x)
                cells += [fmt(fa), fmt(fb), f"{fb / fa:.3f}" if fa and fb else "—"]
            print(f"| {s} | " + " | ".join(cells) + " |")
        print("\n| T1 run | final acc | layer-1 heads with induction strength > 0.4 |\n|---|---|---|")
        for rid in sorted(p.name for p in (out / "t1").iterdir() if (p / "summary.json").is_file()):
            summary = json.loads((out / "t1" / rid / "summary.json").read_text())
            final = summary["final"][summary["main_split"]]
            heads = [h for h, v in final.get("induction_strength", {}).items() if h.startswith("L1") and v > 0.4]
            print(f"| {rid} | {final['acc']:.4f} | {len(heads)} ({', '.join(heads)}) |")

    if all((out / n / "sweep.json").is_file() for n in ("t4", "t4_bf16")):
        a, b = crossings(out / "t4"), crossings(out / "t4_bf16")
        print("\n| T4 condition | seed | fp32 t(0.5) | bf16 t(0.5) | bf16/fp32 |\n|---|---|---|---|---|")
        for key in sorted(a):
            fa, fb = a[key][0.5], b.get(key, {}).get(0.5)
            print(f"| {key[0]} | {key[1]} | {fmt(fa)} | {fmt(fb)} | {f'{fb / fa:.3f}' if fa and fb else '—'} |")
        print("\n| T4 condition | median ratio to none, fp32 | bf16 |\n|---|---|---|")
        for cond in sorted({c for c, _ in a}):
            row = []
            for d in (a, b):
                r = [d[(cond, s)][0.5] / d[("none", s)][0.5] for c, s in d if c == cond
                     and d[(cond, s)][0.5] and d.get(("none", s), {}).get(0.5)]
                row.append(f"{statistics.median(r):.3f}" if r else "—")
            print(f"| {cond} | {row[0]} | {row[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
