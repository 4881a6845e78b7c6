"""Training speed of the Singh et al. main config (2 layers × 8 heads, d_model 64, batch 32).

Prints medians (nothing is written to disk):
- training steps/s with measures off: the trainer's own step (batch generation, forward through
  PlainForward, loss, backward, fused Adam), timed in chunks of 200 steps;
- the cost of one full evaluation (4 splits × 1000 sequences, every measure);
- the share of wall time spent in evaluation at the default cadence (every 10,000 sequences).
Targets (issue 2, one core): >= 400 steps/s; evals <= 10 % of a run.

    .venv/bin/python benchmarks/train_speed.py [--chunks 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from optolab.forward import PlainForward
from optolab.loader import load_protocol
from optolab.measures.evaluate import EvalSet, evaluate
from optolab.model import build_model
from optolab.tasks import IGNORE, make_task
from optolab.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--chunk-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    protocol = load_protocol(ROOT / "protocols" / "singh2024" / "main.yaml")
    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    model = build_model(cfg, 0)
    opt = make_optimizer(protocol, model)
    forward = PlainForward()
    bs = protocol.train.batch_size

    def step(i: int) -> None:
        batch = task.train_batch(0, i, bs)
        logits, _ = forward(model, batch, training=True)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(100):
        step(i)
    rates = []
    for c in range(args.chunks):
        t = time.perf_counter()
        for i in range(args.chunk_steps):
            step(1000 + c * args.chunk_steps + i)
        rates.append(args.chunk_steps / (time.perf_counter() - t))
    gen = []
    for i in range(200):
        t = time.perf_counter()
        task.train_batch(0, i, bs)
        gen.append(time.perf_counter() - t)

    evals = EvalSet.build(task, protocol.measures, 1, cfg.n_ctx)
    costs = []
    for _ in range(7):
        t = time.perf_counter()
        evaluate(model, task, protocol.measures, evals, forward)
        costs.append(time.perf_counter() - t)

    sps = statistics.median(rates)
    eval_s = statistics.median(costs)
    cadence_steps = 10_000 / bs
    share = eval_s / (cadence_steps / sps + eval_s)
    print(f"config: {cfg.n_layers}L x {cfg.n_heads}H, d_model {cfg.d_model}, batch {bs}, threads {args.threads}")
    print(f"training steps/s (median of {args.chunks} x {args.chunk_steps}): {sps:.0f}   [target >= 400]")
    print(f"  batch generation: {statistics.median(gen) * 1e6:.0f} us = {statistics.median(gen) * sps:.1%} of a step")
    print(f"one full eval: {eval_s * 1e3:.1f} ms")
    print(f"eval share of wall time at every 10,000 sequences: {share:.1%}   [target <= 10%]")


if __name__ == "__main__":
    main()
