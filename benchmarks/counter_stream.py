"""Per-member-step cost of an ensemble's training batches: the torch stream (one ``train_batch``
per member, today's default) against the counter stream (``task.data_stream: counter``: every
member's batch in one stacked draw, ``train_batches``), side by side.

For S = 1, 8, 64 members (distinct data seeds) of the fewshot and repeat_tokens protocols below,
each repeat times both ways in turn (A, B, A, B, …, so load on a shared machine falls on both
alike) and prints the medians in ms per member-step, and their ratio. ``--device cuda`` draws the
counter stream on a GPU (the torch stream is always drawn on the CPU, as runs draw it) and
synchronises before each clock reading. Nothing is written to disk.

    .venv/bin/python benchmarks/counter_stream.py [--repeats 30] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from optolab.protocol.loader import load_protocol
from optolab.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ["singh2024/main.yaml", "olsson2022/repeat_2layer.yaml"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(rel: str, S: int, repeats: int, device: torch.device) -> tuple[float, float, int]:
    """Median ms per member-step: (torch stream, counter stream), and the batch size."""
    protocol = load_protocol(ROOT / "protocols" / rel)
    torch_task = make_task(protocol.task)
    counter_task = make_task(protocol.task.model_copy(update={"data_stream": "counter"}))
    bs, seeds = protocol.train.batch_size, list(range(S))
    a, b = [], []
    for i in range(repeats + 3):  # the first 3: warm-up (bank moved to the device, allocator)
        t = time.perf_counter()
        for s in seeds:
            torch_task.train_batch(s, i, bs)
        ta = time.perf_counter() - t
        _sync(device)
        t = time.perf_counter()
        counter_task.train_batches(seeds, i, bs, device)
        _sync(device)
        tb = time.perf_counter() - t
        if i >= 3:
            a.append(ta / S)
            b.append(tb / S)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3, bs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"ms per member-step (medians of {args.repeats}); torch stream on the CPU, counter stream on {device}")
    print(f"{'task':<16} {'batch':>6} {'S':>5} {'torch':>8} {'counter':>8} {'torch/counter':>14}")
    for rel in PROTOCOLS:
        for S in args.sizes:
            a, b, bs = compare(rel, S, args.repeats, device)
            kind = load_protocol(ROOT / "protocols" / rel).task.kind
            print(f"{kind:<16} {bs:>6} {S:>5} {a:>8.3f} {b:>8.3f} {a / b:>13.2f}x", flush=True)


if __name__ == "__main__":
    main()
