"""bfloat16 against float32 training on this CPU, side by side in one run (issue 33, item 1).

The main config (2 layers × 8 heads, d_model 64, batch 32) with one pattern clamp (perfect
previous-token on L0H2), one core, the trainer's own step (batch generation included), timed in
chunks that alternate between the settings: eager and compiled, each in ``train.precision:
fp32`` and ``bf16`` (the forward under bfloat16 autocast: weight products in bfloat16 with float32
master weights, Adam and loss). Prints a markdown table of medians and the bf16/fp32 ratios.
Nothing is written to disk.

    taskset -c 1 .venv/bin/python benchmarks/bf16_speed.py [--chunks 7] [--chunk-steps 300]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from main_config import chunk_rates, main_config  # benchmarks/main_config.py

PREV = {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token"}
SETTINGS = {f"{path} {precision}": {**train, "precision": precision}
            for path, train in (("eager", {}), ("compiled", {"compile": True})) for precision in ("fp32", "bf16")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--chunk-steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    steppers = {name: main_config([PREV], **train).step for name, train in SETTINGS.items()}
    rates = chunk_rates(steppers, args.chunks, args.chunk_steps)
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"main config, one pattern clamp, one core, median of {args.chunks} chunks of {args.chunk_steps} steps")
    print("| path | fp32 steps/s | bf16 steps/s | bf16 ÷ fp32 |")
    print("|---|---|---|---|")
    for path in ("eager", "compiled"):
        a, b = med[f"{path} fp32"], med[f"{path} bf16"]
        print(f"| {path} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
