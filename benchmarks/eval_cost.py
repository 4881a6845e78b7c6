"""What one evaluation costs, with the weight products through torch's BLAS (MKL) and through
oneDNN (``optolab.model.kernels.product``), side by side in one process.

Main config with one pattern clamp (as ``speed_table.py``), every default measure, the
protocol's eval set (4 splits x 1000 sequences) and per-example losses, as the RunBook calls
``evaluate``; eager (nnsight) and compiled. The two products alternate chunk by chunk; medians.
Nothing is written.

    taskset -c 1 .venv/bin/python benchmarks/eval_cost.py [--chunks 7] [--per-chunk 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from main_config import main_config  # benchmarks/main_config.py

from optolab.measures.evaluate import EvalSet, evaluate
from optolab.model import kernels

PREV = {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--per-chunk", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    available = kernels.ONEDNN  # False where oneDNN's product is not used at all: both columns are then MKL
    print(f"one eval (4 splits x 1000 sequences, every default measure), main config, one core; "
          f"median ms over {args.chunks} chunks of {args.per_chunk}")
    for name, train in (("eager (nnsight)", {"clamp_engine": "nnsight"}), ("compiled", {"compile": True})):
        s = main_config([PREV], **train)
        for i in range(20):
            s.step(i)
        p = s.protocol
        evals = EvalSet.build(s.task, p.measures, p.seeds.eval, s.cfg.n_ctx)

        def once() -> None:
            evaluate(s.model, s.task, p.measures, evals, s.forward, step=20, per_example={})

        times: dict[str, list[float]] = {"MKL": [], "oneDNN": []}
        for chunk in range(args.chunks + 1):  # the first chunk of each warms up (and compiles)
            for product, flag in (("MKL", False), ("oneDNN", True)):
                kernels.ONEDNN = flag and available
                t = time.perf_counter()
                for _ in range(args.per_chunk):
                    once()
                if chunk:
                    times[product].append((time.perf_counter() - t) / args.per_chunk * 1e3)
        kernels.ONEDNN = available
        mkl, dnn = statistics.median(times["MKL"]), statistics.median(times["oneDNN"])
        print(f"  {name:16s} MKL {mkl:6.1f} ms   oneDNN {dnn:6.1f} ms   ({mkl / dnn:.2f}x)")


if __name__ == "__main__":
    main()
