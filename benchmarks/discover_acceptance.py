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

``--reuse-screen`` (for a machine that cannot spare the fixed design's own hours): the fixed
design's runs of seeds 0-7 are taken from the discovery's screen where it ran them (the same
protocol, seed and stop rule give the same run: determinism, up to the float summation order of
another ensemble packing) and only the missing (condition, seed) pairs are trained, in
``OUT/fixed_rest`` with the screen's cap. Its compute is then each run's share of its job's
wall time (a job of k members: wall / k), summed over the 8 × 17 runs; the full-budget compute
is extrapolated from each run's steps trained to its budget (evals and compiles scaled with it,
an overestimate of the compile's share).

``--time-fixed`` measures what the fixed design costs at its full budgets instead of
extrapolating: one job of the reference and one of the first condition (8 members each, no
stop), with the base protocol's own evals and with discover's (the main split only), side by
side on the workers (:func:`time_fixed`); a full-budget job trains the same steps whatever its
clamp, so the design is that × its 17 jobs.

Both are resumable (re-running skips finished runs). Run it where nothing else competes for the
CPUs (timings are wall-clock):

  python benchmarks/discover_acceptance.py --out results/acceptance            # ~15 min + the fixed design
  python benchmarks/discover_acceptance.py --out results/acceptance --fixed-stop
  python benchmarks/discover_acceptance.py --out results/acceptance --reuse-screen --time-fixed
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


def run_shares(sweep_dir: Path) -> dict[str, tuple[float, int, int]]:
    """``{run id: (CPU-seconds share, steps trained, budget steps)}``: each job's wall time
    (its longest member's) split evenly over its members; a run's last job only."""
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    jobs = [job for inv in meta.get("invocations", []) for job in inv.get("jobs", [])]
    out = {}
    for job in jobs:
        metas = {}
        for rid in job:
            f = sweep_dir / rid / "meta.json"
            if f.is_file():
                metas[rid] = json.loads(f.read_text())
        wall = max((float(m.get("wall_time_s", 0.0)) for m in metas.values()), default=0.0)
        for rid, m in metas.items():
            steps = int(m["segments"][-1]["ended_at_step"])
            train = yaml.safe_load((sweep_dir / rid / "protocol.yaml").read_text())["train"]
            budget = train["steps"] or -(-int(train["sequences"]) // int(train["batch_size"]))
            out[rid] = (wall / len(job), steps, budget)
    return out


def reuse_screen(out: Path, spec, record: dict, seeds: int, workers) -> tuple[dict, dict, float, float, float]:
    """The fixed design from the screen's runs plus the missing pairs (module docstring)."""
    from optolab.experiments import discover
    from optolab.experiments.sweep import run_sweep

    screen = Path(record["stages"]["screen"]["dir"])
    loss = spec.question.loss
    have = discover.times(screen, loss)
    ref = discover.REFERENCE
    wanted = range(seeds)
    from optolab.experiments.answering import cap_sequences

    cap = cap_sequences(spec.question, list(record["stages"]["screen"]["reference_times"].values()))
    q = spec.question
    rule = lambda c: {"metric": "loss", "threshold": q.loss, "direction": "down",  # noqa: E731
                      "margin_evals": q.margin_evals, "cap_sequences": c}
    clamps = {n: c for n, c, _ in discover.screen_conditions(spec, str((FILE.parent / spec.protocol).resolve()))}
    listed = []
    for n in [ref, *clamps]:
        missing = [s for s in wanted if s not in have.get(n, {})]
        if missing:
            c = {"name": n, "seeds": missing, "set": {"train.stop": rule(None if n == ref else cap)}}
            if n != ref:
                c["clamps"] = clamps[n]
            listed.append(c)
    rest = out / "fixed_rest"
    t1 = time.monotonic()
    if listed:
        data = {"name": "fixed_rest", "protocol": str((FILE.parent / spec.protocol).resolve()), "seeds": [0],
                "set": spec.set, "conditions": listed, "stop_at_answer": False, "run_figures": False}
        if any(c["name"] == ref for c in listed):
            data["reference"] = ref
        (out / "fixed_rest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        run_sweep(out / "fixed_rest.yaml", rest, workers=workers, max_runs=10_000)
    wall = time.monotonic() - t1
    t, c = {}, {}
    for d in (screen, rest):
        if (d / "sweep.json").is_file():
            for n, v in discover.times(d, loss).items():
                t.setdefault(n, {}).update({s: x for s, x in v.items() if s in wanted})
            for n, v in discover.censored(d, loss).items():
                c.setdefault(n, {}).update({s: x for s, x in v.items() if s in wanted})
    cpu = full = 0.0
    for d in (screen, rest):
        if not (d / "sweep.json").is_file():
            continue
        info = json.loads((d / "sweep.json").read_text())["runs"]
        for rid, (share, steps, budget) in run_shares(d).items():
            if info[rid]["seed"] in wanted:
                cpu += share
                full += share * budget / max(steps, 1)
    return t, c, cpu, full, wall


def time_fixed(out: Path, spec, seeds: int, workers) -> dict[str, float]:
    """CPU-seconds of one job of the fixed design at its full budget (no stop), measured: the
    reference and the first condition, ``seeds`` members each, with the base protocol's own evals
    (what one runs without the instrument) and with discover's (the question's split only), side
    by side on the workers. A full-budget job trains the same steps whatever its clamp, so the
    fixed design's compute is this times its (conditions + 1) jobs."""
    from optolab.experiments import discover
    from optolab.experiments.sweep import run_sweep

    base = str((FILE.parent / spec.protocol).resolve())
    name, clamps, _ = discover.screen_conditions(spec, base)[0]
    lean = discover.run_set(spec, base)
    conds = [{"name": f"{who}_{evals}", "seeds": list(range(seeds)), "set": dict(sets),
              **({"clamps": clamps} if who != "reference" else {})}
             for evals, sets in (("own", spec.set), ("lean", lean)) for who in ("reference", name)]
    data = {"name": "fixed_sample", "protocol": base, "seeds": [0], "set": {}, "conditions": conds,
            "stop_at_answer": False, "run_figures": False}
    # first the same jobs for a few hundred steps, so torch.compile's on-disk cache holds their
    # graphs: the 17 jobs of a real fixed design compile each graph cold once, not 17 times
    warm = {**data, "name": "fixed_sample_warm",
            "conditions": [{**c, "set": {**c["set"], "train.sequences": 10_000, "train.compile": True}} for c in conds]}
    (out / "fixed_sample_warm.yaml").write_text(yaml.safe_dump(warm, sort_keys=False))
    if not (out / "fixed_sample" / "sweep.json").is_file():
        run_sweep(out / "fixed_sample_warm.yaml", out / "fixed_sample_warm", workers=workers, max_pack=seeds,
                  max_runs=10_000)
    (out / "fixed_sample.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    run_sweep(out / "fixed_sample.yaml", out / "fixed_sample", workers=workers, max_pack=seeds, max_runs=10_000)
    meta = json.loads((out / "fixed_sample" / "sweep.json").read_text())
    per_job: dict[str, list[float]] = {}
    for job in [j for inv in meta["invocations"] for j in inv["jobs"]]:
        walls = [json.loads((out / "fixed_sample" / rid / "meta.json").read_text())["wall_time_s"] for rid in job]
        evals = meta["runs"][job[0]]["condition"].rsplit("_", 1)[1]
        per_job.setdefault(evals, []).append(max(walls) * seeds / len(job))
    return {k: sum(v) / len(v) for k, v in per_job.items()}


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
    ap.add_argument("--reuse-screen", action="store_true", help="the fixed design's seeds from the screen (docstring)")
    ap.add_argument("--time-fixed", action="store_true",
                    help="measure the fixed design's full-budget compute on sample jobs (time_fixed)")
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
    cpu_full = None
    if args.reuse_screen:
        t, c, cpu_fixed, cpu_full, fixed_wall = reuse_screen(out, spec, record, args.seeds, args.workers)
    else:
        t1 = time.monotonic()
        fixed_dir = out / "fixed8"
        run_sweep(fixed_sweep(out, spec, args.fixed_stop, args.seeds), fixed_dir, workers=args.workers,
                  max_runs=10_000)
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
        ci = lambda v: (f"{v['ratio'] if v['ratio'] is not None else float('inf'):.3g} "  # noqa: E731
                        f"[{v['ci'][0] if v['ci'][0] is None else format(v['ci'][0], '.3g')}, "
                        f"{v['ci'][1] if v['ci'][1] is None else format(v['ci'][1], '.3g')}]")
        print(f"| {n} | {mine} | {ci(shown)} ({shown['n_pairs']}) | {theirs} | {ci(f) if f else '-'} | "
              f"{'yes' if ok else 'no'} |")
    print()
    print(f"agreement: {agree}/{len(screen)}; compute: discover {cpu_discover / 60:.1f} CPU-min, fixed "
          f"{cpu_fixed / 60:.1f} CPU-min (ratio {cpu_fixed / max(cpu_discover, 1e-9):.2f}x); fixed wall this invocation "
          f"{fixed_wall / 60:.1f} min")
    if cpu_full is not None:
        print(f"fixed design at full budgets (extrapolated from steps trained): {cpu_full / 60:.1f} CPU-min "
              f"(ratio {cpu_full / max(cpu_discover, 1e-9):.2f}x)")
    measured = None
    if args.time_fixed:
        per_job = time_fixed(out, spec, args.seeds, args.workers)
        jobs = len(screen) + 1
        measured = {k: v * jobs for k, v in per_job.items()}
        for k, v in measured.items():
            print(f"fixed design at full budgets, {'the protocol' if k == 'own' else 'discover'}'s evals (measured on "
                  f"sample jobs, x{jobs} jobs): {v / 60:.1f} CPU-min (ratio {v / max(cpu_discover, 1e-9):.2f}x)")
    (out / "acceptance.json").write_text(json.dumps({"discover_cpu_s": cpu_discover, "fixed_cpu_s": cpu_fixed,
                                                     "fixed_full_cpu_s": cpu_full, "agree": agree, "n": len(screen),
                                                     "discover_wall_s": wall, "fixed_full_measured_cpu_s": measured}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
