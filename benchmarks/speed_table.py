"""The speed table of issue 20, side by side in one run: optolab's paths against JAX's.

Main config (2 layers × 8 heads, d_model 64, batch 32) with one pattern clamp (perfect
previous-token on L0H2), one core:
- optolab nnsight, hooks and compiled training steps/s (the trainer's own step, batch
  generation included), timed in chunks that alternate between the paths;
- the JAX reference (``benchmarks/jax_reference.py``, its own environment: the issue allows JAX
  outside the project's dependencies), step loop and ``lax.scan`` loop, run in between;
- the fraction of the matmul limit: FLOPs of matrix work per step (45.6 M, counted in
  ``jax_reference.py``) × steps/s over the single-core float32 matmul rate at the model's
  shapes (``jax_reference.py --peak``);
- compiled ensembles of 1 / 8 / 16 (T4's single-head config, model-steps/s, marginal rate:
  ``benchmarks/ensemble.py``).
Prints a markdown table of medians. Nothing is written to disk.

    /tmp/jaxenv: python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax numpy
    taskset -c 1 .venv/bin/python benchmarks/speed_table.py [--chunks 7] [--jax-python /tmp/jaxenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from main_config import chunk_rates, main_config  # benchmarks/main_config.py

HERE = Path(__file__).resolve().parent
PREV = {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token"}
PATHS = {"nnsight": {"clamp_engine": "nnsight"}, "hooks": {"clamp_engine": "hooks"}, "compiled": {"compile": True}}


def _jax(python: str, *flags: str) -> dict:
    got = subprocess.run([python, str(HERE / "jax_reference.py"), "--json", *flags], capture_output=True,
                         text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--chunk-steps", type=int, default=300)
    ap.add_argument("--jax-python", default="/tmp/jaxenv/bin/python")
    ap.add_argument("--ensembles", type=int, nargs="*", default=[1, 8, 16])
    args = ap.parse_args()
    torch.set_num_threads(1)
    steppers = {name: main_config([PREV], **train).step for name, train in PATHS.items()}
    jax_rates: dict[str, list[float]] = {"JAX step loop": [], "JAX lax.scan loop": []}
    have_jax = os.path.exists(args.jax_python)
    flops = None

    def jax_chunk() -> None:  # one JAX measurement (3 chunks of its own) between optolab's rounds
        nonlocal flops
        got = _jax(args.jax_python, "--chunks", "3", "--chunk-steps", str(args.chunk_steps))
        jax_rates["JAX step loop"].append(got["jax_step_steps_per_s"])
        jax_rates["JAX lax.scan loop"].append(got["jax_scan_steps_per_s"])
        flops = got["flops_per_step"]

    rates = chunk_rates(steppers, args.chunks, args.chunk_steps, jax_chunk if have_jax else None)
    peak = None
    if have_jax:
        peak = _jax(args.jax_python, "--peak")["matmul_gflops"]["peak"] * 1e9
        rates.update(jax_rates)
    else:
        print(f"(no JAX at {args.jax_python}: see the docstring)", file=sys.stderr)
        flops = 45.576e6
    print(f"main config, one pattern clamp, one core, median of {args.chunks} chunks of {args.chunk_steps} steps")
    print("| path | steps/s | fraction of the matmul limit |")
    print("|---|---|---|")
    for name, r in rates.items():
        med = statistics.median(r)
        frac = f"{med * flops / peak:.0%}" if peak else "—"
        print(f"| {name} | {med:,.0f} | {frac} |")
    if peak:
        print(f"matmul limit: {peak / 1e9:.0f} GFLOP/s at the model's shapes (XLA, one core) = "
              f"{peak / flops:,.0f} steps/s at {flops / 1e6:.1f} MFLOP/step")
    if args.ensembles:
        from ensemble import measure  # benchmarks/ensemble.py

        print("| compiled ensemble (T4 config) | model-steps/s |")
        print("|---|---|")
        for S in args.ensembles:
            rate, _ = measure("prev_token", S, 800, True)
            print(f"| S = {S} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
