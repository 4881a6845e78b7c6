"""bfloat16 against float32 training on this CPU, side by side in one run (issue 33, item 1).

The main config (2 layers × 8 heads, d_model 64, batch 32) with one pattern clamp (perfect
previous-token on L0H2), one core, the trainer's own step (batch generation included), timed in
chunks that alternate between the settings: eager and compiled, each in ``train.precision:
fp32`` and ``bf16`` (the forward under bfloat16 autocast: weight products in bfloat16 with float32
master weights, Adam and loss). Between rounds, the JAX reference (``jax_reference.py``, its own
environment, see its docstring) in float32 and with ``--bf16`` products, so every row is side by
side. Each row's fraction of the product rate: steps/s × the step's matrix FLOPs over the
single-core rate of chained products at the model's shapes, in that precision (torch's and
XLA's own: ``product_rate`` here, ``jax_reference.py --peak [--bf16]``). Prints a markdown table
of medians and the bf16/fp32 ratios. Nothing is written to disk.

    taskset -c 1 .venv/bin/python benchmarks/bf16_speed.py [--chunks 7] [--chunk-steps 300] [--jax-python /tmp/jaxenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from main_config import chunk_rates, main_config  # benchmarks/main_config.py

HERE = Path(__file__).resolve().parent
FLOPS = 45.576e6  # matrix FLOPs of one main-config step (jax_reference.flops_per_step)
SHAPES = {"proj_160x64x64": (160, 64, 64), "xmap_96x512x64": (96, 512, 64)}  # as jax_reference.matmul_peak


def product_rate(dtype: torch.dtype, reps: int = 2000) -> float:
    """torch's single-core GFLOP/s of chained dependent products at the step's shapes (the best
    of them), in ``dtype``: the same measurement as ``jax_reference.matmul_peak``."""
    best = 0.0
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES.values():
        w = torch.linalg.qr(torch.randn(k, n, generator=g))[0].to(dtype)
        x = torch.randn(m, k, generator=g).to(dtype)
        flop = (2 if k == n else 4) * m * k * n * reps
        times = []
        for _ in range(5):
            y = x
            t = time.perf_counter()
            for _ in range(reps):
                y = y @ w if k == n else (y @ w) @ w.T
            times.append(time.perf_counter() - t)
        best = max(best, flop / statistics.median(times) / 1e9)
    return best


def _jax(python: str, *flags: str) -> dict:
    got = subprocess.run([python, str(HERE / "jax_reference.py"), "--json", *flags], capture_output=True,
                         text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])

PREV = {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token"}
SETTINGS = {f"{path} {precision}": {**train, "precision": precision}
            for path, train in (("eager", {}), ("compiled", {"compile": True})) for precision in ("fp32", "bf16")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--chunk-steps", type=int, default=300)
    ap.add_argument("--jax-python", default="/tmp/jaxenv/bin/python")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steppers = {name: main_config([PREV], **train).step for name, train in SETTINGS.items()}
    have_jax = os.path.exists(args.jax_python)
    jax_rates: dict[str, list[float]] = {}

    def jax_round() -> None:  # JAX float32 and bf16 (3 chunks of their own each) between torch's rounds
        for precision, flags in (("fp32", ()), ("bf16", ("--bf16",))):
            got = _jax(args.jax_python, "--chunks", "3", "--chunk-steps", str(args.chunk_steps), *flags)
            jax_rates.setdefault(f"JAX step loop {precision}", []).append(got["jax_step_steps_per_s"])
            jax_rates.setdefault(f"JAX lax.scan loop {precision}", []).append(got["jax_scan_steps_per_s"])

    rates = chunk_rates(steppers, args.chunks, args.chunk_steps, jax_round if have_jax else None)
    rates.update(jax_rates)
    med = {name: statistics.median(r) for name, r in rates.items()}
    peaks = {("torch", p): product_rate(dt) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    if have_jax:
        for p, flags in (("fp32", ()), ("bf16", ("--bf16",))):
            peaks[("JAX", p)] = _jax(args.jax_python, "--peak", *flags)["matmul_gflops"]["peak"]
    print(f"main config, one pattern clamp, one core, median of {args.chunks} chunks of {args.chunk_steps} steps"
          + ("" if have_jax else f" (no JAX at {args.jax_python})"))
    print("| path | fp32 steps/s | bf16 steps/s | bf16 ÷ fp32 | fraction of the fp32 product rate | "
          "fraction of the bf16 product rate |")
    print("|---|---|---|---|---|---|")
    for path in ("eager", "compiled", "JAX step loop", "JAX lax.scan loop"):
        if f"{path} fp32" not in med:
            continue
        a, b = med[f"{path} fp32"], med[f"{path} bf16"]
        lib = "JAX" if path.startswith("JAX") else "torch"
        fa, fb = a * FLOPS / (peaks[(lib, "fp32")] * 1e9), b * FLOPS / (peaks[(lib, "bf16")] * 1e9)
        print(f"| {path} | {a:,.0f} | {b:,.0f} | {b / a:.2f} | {fa:.0%} | {fb:.0%} |")
    print("product rates at the model's shapes, one core (GFLOP/s): "
          + ", ".join(f"{lib} {p} {v:.0f}" for (lib, p), v in peaks.items()))


if __name__ == "__main__":
    main()
