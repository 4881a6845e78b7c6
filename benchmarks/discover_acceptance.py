"""Issue 31's acceptance run: `optolab discover` on the quickstart (8 layer-0 heads ×
{previous-token, ablate}) against an exhaustive fixed 8-seed screen of the same 16 conditions,
side by side on this machine. Prints the wall time of the discovery, the agreement table of
verdicts and the compute ratio.

The fixed design is what one would run without the instrument: every condition and the
reference on 8 seeds at their full budgets (``--fixed-stop`` lets it stop at the answer too, to
separate what sequential seeds save from what stopping saves). Its verdicts use the same rule
(:func:`optolab.experiments.sequential.verdict`: effect / null within the margin / open) on its
8 pairs. The discovery's verdict per condition: confirmed effect (its direction), "screen effect,
not confirmed", null, or open (seed cap). Agreement counts a confirmed effect against a fixed
effect in the same direction, and a null or open against a fixed null or open.

Both are resumable (re-running skips finished runs). Run it where nothing else competes for the
CPUs (timings are wall-clock):

  python benchmarks/discover_acceptance.py --out results/acceptance            # ~15 min + the fixed design
  python benchmarks/discover_acceptance.py --out results/acceptance --fixed-stop
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "protocols" / "discover" / "quickstart_layer0.yaml"


def fixed_sweep(out: Path, spec, stop: bool, seeds: int) -> Path:
    data = {"name": "fixed8", "protocol": str((FILE.parent / spec.protocol).resolve()), "seeds": list(range(seeds)),
            "set": spec.set, "stop_at_answer": stop and spec.question.model_dump(), "run_figures": False,
            "design": {"kind": "screen", "reference": "reference",
                       "targets": spec.targets.model_dump(exclude_none=True), "interventions": spec.interventions}}
    path = out / "fixed8.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> int:
    import torch

    from optolab.experiments import discover
    from optolab.experiments.cost import sweep_cpu_s
    from optolab.experiments.sweep import run_sweep

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/acceptance")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--fixed-stop", action="store_true", help="the fixed design stops at the answer too")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--skip-fixed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    spec = discover.load(FILE)

    t0 = time.monotonic()
    record = discover.run_discover(FILE, out / "discover", workers=args.workers)
    wall = time.monotonic() - t0
    cpu_discover = sum(s.get("compute_s", 0.0) for s in record["stages"].values())
    print(f"discover: {wall / 60:.1f} min wall this invocation (stages recorded earlier are not re-timed), "
          f"{cpu_discover / 60:.1f} CPU-min over its runs")
    if args.skip_fixed:
        return 0
    t1 = time.monotonic()
    fixed_dir = out / "fixed8"
    run_sweep(fixed_sweep(out, spec, args.fixed_stop, args.seeds), fixed_dir, workers=args.workers, max_runs=10_000)
    fixed_wall = time.monotonic() - t1
    cpu_fixed = sweep_cpu_s(fixed_dir)
    t, c = discover.times(fixed_dir, spec.question.loss), discover.censored(fixed_dir, spec.question.loss)
    fixed = {n: discover.judge(t.get(n, {}), t.get("reference", {}), spec.margin, cond_censored=c.get(n),
                               ref_censored=c.get("reference")) for n in t if n != "reference"}

    screen = record["stages"]["screen"]["verdicts"]
    confirm = record["stages"].get("confirm", {}).get("verdicts", {})
    print()
    print(f"| condition | discover | ratio [95 % CI] (pairs) | fixed {args.seeds}-seed | ratio [95 % CI] | agree |")
    print("|---|---|---|---|---|---|")
    agree = 0
    for n in screen:
        s, c, f = screen[n], confirm.get(n), fixed.get(n)
        if c is not None and c.get("confirmed"):
            mine, shown = f"effect ({c['direction']})", c
        elif c is not None:
            mine, shown = "screen effect, not confirmed", c
        else:
            mine, shown = s["verdict"] + (" (seed cap)" if s.get("at_cap") else ""), s
        theirs = "missing" if f is None else (f"effect ({f['direction']})" if f["verdict"] == "effect" else f["verdict"])
        ok = f is not None and ((mine.startswith("effect") and theirs == mine) or
                                (not mine.startswith("effect") and not theirs.startswith("effect")))
        agree += ok
        ci = lambda v: f"{v['ratio'] if v['ratio'] is not None else float('inf'):.3g} [{v['ci'][0]}, {v['ci'][1]}]"  # noqa: E731
        print(f"| {n} | {mine} | {ci(shown)} ({shown['n_pairs']}) | {theirs} | {ci(f) if f else '-'} | "
              f"{'yes' if ok else 'no'} |")
    print()
    print(f"agreement: {agree}/{len(screen)}; compute: discover {cpu_discover / 60:.1f} CPU-min, fixed "
          f"{cpu_fixed / 60:.1f} CPU-min (ratio {cpu_fixed / max(cpu_discover, 1e-9):.2f}x); fixed wall this invocation "
          f"{fixed_wall / 60:.1f} min")
    (out / "acceptance.json").write_text(json.dumps({"discover_cpu_s": cpu_discover, "fixed_cpu_s": cpu_fixed,
                                                     "agree": agree, "n": len(screen), "discover_wall_s": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
