"""What clamps cost: training steps/s of the Singh et al. main config under each clamp engine.

Conditions run round-robin in chunks inside one process (so drift and thermal noise hit them
alike); prints the median steps/s of each and its overhead against no clamp. Nothing is written.
- none: PlainForward (no nnsight);
- one pattern clamp through nnsight (perfect previous-token on L0H2) and the same through the
  raw-hook fast path;
- head ablation (7 layer-2 heads) through nnsight — the single-head model of Fig 5b;
- a two-pass clamp (pattern-preserving ablation: clean pass + clamped pass);
- the layer-1 clamp (two traces per step);
- no clamp, the pattern clamp, the two-pass and the layer-1 clamp on the compiled path
  (``train.compile``; compiled during the warm-up, so the rates are steady-state).
Targets, one core: one clamp through nnsight costs <= 10 % of a step (issue 3); a clamped run
>= 555 steps/s (issue 6, the JAX per-step figure).

    .venv/bin/python benchmarks/clamp_overhead.py [--chunks 7] [--chunk-steps 150]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from main_config import main_config  # benchmarks/main_config.py

PREV = {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token"}
CONDITIONS = {
    "none": ([], "nnsight"),
    "pattern clamp, nnsight": ([PREV], "nnsight"),
    "pattern clamp, hooks": ([PREV], "hooks"),
    "ablate 7 heads, nnsight": ([{"kind": "ablate", "site": "v1", "heads": [0, 1, 2, 4, 5, 6, 7]}], "nnsight"),
    "two-pass (pattern-preserving)": ([{"kind": "preserve", "site": "pattern1"},
                                       {"kind": "ablate", "site": "v0", "heads": [2]}], "nnsight"),
    "layer-1 clamp (two traces)": ([{"kind": "layer_clamp"}], "nnsight"),
    "none, compiled": ([], "compile"),
    "pattern clamp, compiled": ([PREV], "compile"),
    "two-pass, compiled": ([{"kind": "preserve", "site": "pattern1"},
                            {"kind": "ablate", "site": "v0", "heads": [2]}], "compile"),
    "layer-1 clamp, compiled": ([{"kind": "layer_clamp"}], "compile"),
}


def make_stepper(clamps: list[dict], engine: str):
    train = {"compile": True} if engine == "compile" else {"clamp_engine": engine}
    return main_config(clamps, **train).step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--chunk-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    steppers = {name: make_stepper(*spec) for name, spec in CONDITIONS.items()}
    for step in steppers.values():  # warm up (nnsight parses each trace body once)
        for i in range(50):
            step(i)
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    for c in range(args.chunks):
        for name, step in steppers.items():
            t = time.perf_counter()
            for i in range(args.chunk_steps):
                step(100 + c * args.chunk_steps + i)
            rates[name].append(args.chunk_steps / (time.perf_counter() - t))
    base = statistics.median(rates["none"])
    print(f"main config (2L x 8H, d_model 64, batch 32), {args.threads} thread(s), "
          f"median of {args.chunks} chunks x {args.chunk_steps} steps")
    for name, r in rates.items():
        sps = statistics.median(r)
        print(f"  {name:32s} {sps:7.1f} steps/s   {1000 / sps:6.2f} ms/step   overhead {base / sps - 1:+6.1%}")
    one = base / statistics.median(rates["pattern clamp, nnsight"]) - 1
    print(f"target: one clamp through nnsight <= 10 % -> {'met' if one <= 0.10 else 'NOT met'} ({one:.1%})")
    fast = statistics.median(rates["pattern clamp, compiled"])
    print(f"target: one clamp >= 555 steps/s (issue 6) -> {'met' if fast >= 555 else 'NOT met'} "
          f"({fast:.0f}, compiled)")


if __name__ == "__main__":
    main()
