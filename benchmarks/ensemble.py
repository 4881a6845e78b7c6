"""Seed-ensemble throughput: model-steps/s of S members trained as one vmapped model.

Trains the Singh et al. single-head config (``fig5b_none``, and ``fig5b_prev_token`` for one
clamp, ``fig5b_layer1`` for the three-pass layer-1 clamp) for ``--steps`` steps through
:func:`optolab.ensemble.train_ensemble` with S = 1 (the solo trainer), 4, 8, 16, one torch
thread, evals reduced to the first and last step on 8 sequences so that training dominates.
Prints model-steps/s (S × steps / wall) and the speed-up over solo. Nothing is kept on disk.
Targets (issue 6): an ensemble of 8 >= 1,500 model-steps/s on this 2-core machine, i.e. two
processes at >= 750 each.

    .venv/bin/python benchmarks/ensemble.py [--steps 300] [--sizes 1 4 8 16]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from optolab.ensemble import train_ensemble
from optolab.loader import load_protocol, validate_protocol
from optolab.trainer import train

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"unclamped": "fig5b_none", "one clamp": "fig5b_prev_token", "three-pass clamp": "fig5b_layer1"}


def members(name: str, S: int, steps: int) -> list:
    base = load_protocol(ROOT / "protocols" / "singh2024" / f"{name}.yaml").resolved()
    base["train"].pop("sequences")
    base["train"]["steps"] = steps
    base["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": steps}, "keep": 1}
    base["measures"] = {**base["measures"], "schedule": {"unit": "steps", "every": steps}, "eval_sequences": 8}
    out = []
    for s in range(S):
        data = copy.deepcopy(base)
        data["name"] = f"{name}_m{s}"
        data["seeds"]["init"] = data["seeds"]["data"] = s
        out.append(validate_protocol(data))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports, allocator, nnsight
        train(members("fig5b_prev_token", 1, 20)[0], Path(tmp) / "w", progress=False)
        train_ensemble(members("fig5b_prev_token", 2, 20), [Path(tmp) / "w0", Path(tmp) / "w1"])
    print(f"{'protocol':<18}{'S':>4}{'model-steps/s':>15}{'vs solo':>9}")
    for label, name in PROTOCOLS.items():
        solo = None
        for S in args.sizes:
            ps = members(name, S, args.steps)
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                if S == 1:
                    train(ps[0], Path(tmp) / "r", progress=False)
                else:
                    train_ensemble(ps, [Path(tmp) / f"r{i}" for i in range(S)])
                rate = S * args.steps / (time.perf_counter() - t)
            solo = solo or rate
            print(f"{label:<18}{S:>4}{rate:>15.0f}{rate / solo:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
