"""Batch generation cost per task, against a training step of the model that task is used with.

For each protocol below (one per task generator), prints the median time to generate one
training batch (the protocol's batch size) and the median time of one training step of the
protocol's model (batch generation excluded: forward, loss, backward, fused Adam), and their
ratio. Target (issue 4): generation <= 10 % of a step. Nothing is written to disk.

    .venv/bin/python benchmarks/generators.py [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from optolab.model.forward import PlainForward
from optolab.model.transformer import build_model
from optolab.protocol.loader import load_protocol
from optolab.tasks import IGNORE, make_task
from optolab.training.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = [
    "singh2024/main.yaml",  # fewshot
    "olsson2022/repeat_2layer.yaml",  # repeat_tokens
    "reddy2023/labels32.yaml",  # gaussian_icl
    "chan2022/bursty.yaml",  # bursty_classes
    "edelman2024/markov.yaml",  # markov_icl
    "bietti2023/triggers.yaml",  # trigger_bigram
]


def median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{'task':<16} {'protocol':<32} {'batch':>6} {'gen ms':>8} {'step ms':>8} {'gen/step':>9}")
    for rel in PROTOCOLS:
        protocol = load_protocol(ROOT / "protocols" / rel)
        task = make_task(protocol.task)
        model = build_model(protocol.model_config_for(task), 0)
        opt = make_optimizer(protocol, model)
        forward = PlainForward()
        bs = protocol.train.batch_size
        batches = [task.train_batch(0, i, bs) for i in range(8)]

        def step(i: int) -> None:
            batch = batches[i % len(batches)]
            logits, _ = forward(model, batch, training=True)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for i in range(5):  # warm up both
            step(i)
            task.train_batch(1, i, bs)
        gen = median_ms(lambda i: task.train_batch(0, 100 + i, bs), args.repeats)
        stp = median_ms(step, args.repeats)
        flag = "" if gen <= 0.1 * stp else "  [over 10 %]"
        print(f"{task.kind:<16} {rel:<32} {bs:>6} {gen:>8.2f} {stp:>8.2f} {gen / stp:>8.1%}{flag}")


if __name__ == "__main__":
    main()
