"""Soak: train a clamped protocol for many steps through the real trainer and watch memory.

nnsight has leaked across repeated traces before; a sweep runs hundreds of thousands of traced
steps per process. This trains ``protocols/singh2024/fig5b_layer1_copy.yaml`` (two clamps
through nnsight: an ablation, and the three-pass layer-1 clamp with a perfect-copy head) for
``--steps`` steps (default 1e5) with the protocol's evals and checkpoints, and prints RSS at the
start of training, every ``--every`` steps, and at the end. Nothing is kept on disk.
``--compile`` soaks the compiled path (``train.compile``) instead.
Target (issues 6 and 7): RSS growth under 5 % from the first report to the last.

    .venv/bin/python benchmarks/soak.py [--steps 100000] [--every 10000] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from optolab.protocol.loader import load_protocol
from optolab.training.trainer import make_forward

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Watched:
    """The protocol's own Forward, reporting RSS every ``every`` training steps."""

    def __init__(self, inner, every: int, last: int, log: list) -> None:
        self.inner, self.every, self.last, self.log = inner, every, last, log

    def __call__(self, model, batch, *, step, training, **kwargs):
        if training and (step % self.every == 0 or step == self.last):
            self.log.append((step, rss_mib(), time.perf_counter()))
            print(f"step {step:>7}: RSS {self.log[-1][1]:7.1f} MiB", flush=True)
        return self.inner(model, batch, step=step, training=training, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=10_000)
    ap.add_argument("--protocol", default=str(ROOT / "protocols" / "singh2024" / "fig5b_layer1_copy.yaml"))
    ap.add_argument("--compile", action="store_true", help="soak the compiled path (train.compile) instead")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from optolab.protocol.loader import validate_protocol
    from optolab.tasks import make_task
    from optolab.training.trainer import train

    data = load_protocol(args.protocol).resolved()
    data["train"].pop("sequences", None)
    data["train"]["steps"] = args.steps
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": max(args.steps // 5, 1)}, "keep": 1}
    data["train"]["compile"] = args.compile
    protocol = validate_protocol(data)
    task = make_task(protocol.task)
    log: list = []
    forward = Watched(make_forward(protocol, task, protocol.model_config_for(task)), args.every, args.steps - 1, log)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(protocol, Path(tmp) / "run", forward=forward, progress=False)
        wall = time.perf_counter() - t0
    after = rss_mib()
    (first_step, first, _), (last_step, last, _) = log[1] if len(log) > 2 else log[0], log[-1]
    print(f"{args.steps} steps with {len(protocol.clamps)} clamps in {wall:.0f} s ({args.steps / wall:.0f} steps/s)")
    print(f"RSS at step {first_step} (after warm-up): {first:.1f} MiB; at step {last_step}: {last:.1f} MiB; "
          f"growth {100 * (last - first) / first:+.1f} % (target < 5 %)")
    print(f"RSS after the run wrote metrics.parquet and summary.json (pandas): {after:.1f} MiB")


if __name__ == "__main__":
    main()
