"""Training speed of the Singh et al. main config (2 layers × 8 heads, d_model 64, batch 32),
eager and compiled (``train.compile: true``), side by side in one process.

Prints medians (nothing is written to disk):
- training steps/s with measures off: the trainer's own step (batch generation, forward through
  the protocol's Forward, loss, backward, fused Adam), timed in chunks of 200 steps, the two
  paths alternating chunk by chunk so both see the same machine;
- the cost of one full evaluation (4 splits × 1000 sequences, every measure) on each path;
- the share of wall time spent in evaluation at every 10,000 sequences and at the authors'
  every 5,000;
- peak RSS of the process.
Targets (issue 6, one core): >= 555 steps/s with a clamp (the JAX per-step figure; the clamped
rates are in ``clamp_overhead.py``); evals <= 10 % of a run.

    .venv/bin/python benchmarks/train_speed.py [--chunks 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from main_config import main_config  # benchmarks/main_config.py

from optolab.measures.evaluate import EvalSet, evaluate


def setup(compiled: bool):
    run = main_config(compile=compiled)
    protocol, task, cfg = run.protocol, run.task, run.cfg
    evals = EvalSet.build(task, protocol.measures, 1, cfg.n_ctx)

    def one_eval() -> None:
        evaluate(run.model, task, protocol.measures, evals, run.forward)

    return run.step, one_eval, task, protocol.train.batch_size, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--chunk-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    paths = {"eager": setup(False), "compiled": setup(True)}
    for step, one_eval, *_ in paths.values():  # warm up; the compiled path compiles here
        for i in range(100):
            step(i)
        one_eval()
        one_eval()
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for c in range(args.chunks):
        for name, (step, *_) in paths.items():
            t = time.perf_counter()
            for i in range(args.chunk_steps):
                step(1000 + c * args.chunk_steps + i)
            rates[name].append(args.chunk_steps / (time.perf_counter() - t))
    step, one_eval, task, bs, cfg = paths["eager"]
    gen = []
    for i in range(200):
        t = time.perf_counter()
        task.train_batch(0, i, bs)
        gen.append(time.perf_counter() - t)

    print(f"config: {cfg.n_layers}L x {cfg.n_heads}H, d_model {cfg.d_model}, batch {bs}, threads {args.threads}")
    for name, (_, one_eval, *_rest) in paths.items():
        costs = []
        for _ in range(7):
            t = time.perf_counter()
            one_eval()
            costs.append(time.perf_counter() - t)
        sps, eval_s = statistics.median(rates[name]), statistics.median(costs)
        shares = [eval_s / (every / bs / sps + eval_s) for every in (10_000, 5_000)]
        print(f"{name:>9}: {sps:4.0f} training steps/s (median of {args.chunks} x {args.chunk_steps}); "
              f"one full eval {eval_s * 1e3:5.1f} ms; eval share {shares[0]:.1%} at every 10,000 sequences, "
              f"{shares[1]:.1%} at every 5,000")
    print(f"batch generation: {statistics.median(gen) * 1e6:.0f} us per step")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("targets: >= 555 steps/s with a clamp (see clamp_overhead.py); evals <= 10 % of a run")


if __name__ == "__main__":
    main()
