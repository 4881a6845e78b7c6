"""Error rates of the sequential-seed rule (optolab.experiments.sequential) by simulation.

Each simulated screen has ``--conditions`` conditions against one reference. Per seed s, the
reference's log time is ``a_s + e_ref`` and a condition's ``a_s + log r + e_c``, with ``e_ref``,
``e_c`` ~ N(0, σ/√2) independent, so a condition's per-seed log ratio has spread σ and the
conditions' ratios are correlated through the shared reference run, as in a real screen. The
rule runs as ``optolab discover`` runs it: ``--start`` seeds, ``--add`` more per round for open
conditions, up to ``--max``; verdicts from the paired bootstrap CI (effect / null within
``--margin`` / open); Holm over the screen on the exact signed-rank p-values.

Printed per σ: the per-comparison false-positive rate (a null condition called an effect), the
family-wise rate over a screen of nulls (any false "effect"; and any Holm survivor), the power at
a 0.8× effect (one condition at ratio 0.8 among nulls: called an effect; surviving Holm), the
rate of resolved nulls, and the mean seeds per condition.

  python benchmarks/sequential_sim.py --screens 400
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from optolab.experiments import sequential
from optolab.experiments.stats import paired_effect


def screen(rng, ratios, sigma, start, add, max_seeds, margin, alpha, n_boot, test=True):
    k = len(ratios)
    a = rng.normal(0, 0.3, size=max_seeds)
    e_ref = rng.normal(0, sigma / math.sqrt(2), size=max_seeds)
    e = rng.normal(0, sigma / math.sqrt(2), size=(k, max_seeds))
    ref = {s: float(np.exp(a[s] + e_ref[s])) for s in range(max_seeds)}
    seeds = [list(range(start)) for _ in range(k)]
    verdicts = [None] * k
    effects = [None] * k
    while True:
        for i in range(k):
            cond = {s: float(np.exp(a[s] + math.log(ratios[i]) + e[i, s])) for s in seeds[i]}
            effects[i] = paired_effect(cond, {s: ref[s] for s in seeds[i]}, n_boot=n_boot, seed=int(rng.integers(1e9)))
            p = sequential.condition_p(effects[i]["per_seed"]) if test else None
            verdicts[i] = sequential.verdict(effects[i], margin, p, sequential.alpha_per_look(alpha, start, add,
                                                                                              max_seeds))
        grown = [sequential.next_seeds(seeds[i], verdicts[i], add, max_seeds) for i in range(k)]
        if grown == seeds:
            break
        seeds = grown
    L = sequential.looks(start, add, max_seeds)  # Holm on Bonferroni-over-looks p-values
    holm = sequential.holm({i: min(1.0, L * sequential.condition_p(effects[i]["per_seed"])) for i in range(k)}, alpha)
    return verdicts, [holm[i] for i in range(k)], [len(s) for s in seeds], effects


def pipeline(rng, ratios, sigma, args):
    """Screen, then the screen's effects again on fresh seeds: which are confirmed (an effect in
    the screen's direction), as ``optolab discover`` does."""
    v, h, n, eff = screen(rng, ratios, sigma, args.start, args.add, args.max, args.margin, args.alpha, args.n_boot,
                          not args.ci_only)
    hits = [i for i, x in enumerate(v) if x == "effect"]
    confirmed = set()
    if hits:
        v2, _, _, eff2 = screen(rng, [ratios[i] for i in hits], sigma, args.start, args.add, args.max, args.margin,
                                args.alpha, args.n_boot, not args.ci_only)
        confirmed = {i for i, x, e1, e2 in zip(hits, v2, [eff[i] for i in hits], eff2)
                     if x == "effect" and ((e1["ci_low"] or 0) > 1) == ((e2["ci_low"] or 0) > 1)}
    return v, h, n, confirmed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--screens", type=int, default=400)
    ap.add_argument("--conditions", type=int, default=16)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--start", type=int, default=7)
    ap.add_argument("--add", type=int, default=2)
    ap.add_argument("--max", type=int, default=11)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--ci-only", action="store_true", help="the bootstrap CI alone decides (no signed-rank test)")
    args = ap.parse_args()
    t0 = time.time()
    print(f"rule: {'CI alone' if args.ci_only else 'CI and signed-rank p <= alpha/looks'}; "
          f"start {args.start} seeds, +{args.add} per round while open, max {args.max}; null margin "
          f"±{args.margin:.0%}; Holm at {args.alpha} over {args.conditions} conditions; {args.screens} screens per row")
    print("| σ (per-seed log ratio) | FP per comparison (screen) | FWER, screen verdicts | FWER, screen Holm | "
          "FWER, confirmed | power at 0.8×, screen | power, screen Holm | power, confirmed | nulls resolved | "
          "mean seeds (null / 0.8×) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sigma in args.sigmas:
        rng = np.random.default_rng(int(sigma * 1e4))
        fp = fw_raw = fw_holm = pw_raw = pw_holm = resolved_null = fw_conf = pw_conf = 0
        seeds_null = seeds_eff = 0.0
        for _ in range(args.screens):
            v, h, n, conf = pipeline(rng, [1.0] * args.conditions, sigma, args)
            fp += sum(x == "effect" for x in v)
            resolved_null += sum(x == "null" for x in v)
            fw_raw += any(x == "effect" for x in v)
            fw_holm += any(h)
            fw_conf += bool(conf)
            seeds_null += float(np.mean(n))
            v, h, n, conf = pipeline(rng, [0.8] + [1.0] * (args.conditions - 1), sigma, args)
            pw_raw += v[0] == "effect"
            pw_holm += h[0]
            pw_conf += 0 in conf
            seeds_eff += n[0]
        m = args.screens
        print(f"| {sigma} | {fp / (m * args.conditions):.3f} | {fw_raw / m:.3f} | {fw_holm / m:.3f} | {fw_conf / m:.3f} | "
              f"{pw_raw / m:.3f} | {pw_holm / m:.3f} | {pw_conf / m:.3f} | {resolved_null / (m * args.conditions):.3f} | "
              f"{seeds_null / m:.1f} / "
              f"{seeds_eff / m:.1f} |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
