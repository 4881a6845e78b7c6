"""The Singh et al. main config (2 layers × 8 heads, d_model 64, batch 32) as a benchmark's
training step: the trainer's own update (``make_update``: compiled when ``train.compile``), on the
task's batches for data seed 0. Shared by ``train_speed.py``, ``clamp_overhead.py``,
``speed_table.py`` and ``bf16_speed.py`` (:func:`chunk_rates`: settings timed side by side)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from optolab.model.forward import Forward
from optolab.model.transformer import Transformer, build_model
from optolab.protocol.loader import load_protocol
from optolab.protocol.schema import Protocol
from optolab.tasks import make_task
from optolab.training.trainer import make_forward, make_optimizer, make_update

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stepper:
    step: Callable[[int], None]  # one training step on the batch of step i
    protocol: Protocol
    model: Transformer
    forward: Forward
    task: object
    cfg: object


def main_config(clamps: list[dict] = (), **train) -> Stepper:
    """The main config with ``clamps`` and ``train`` overrides (e.g. ``compile=True``); eager on the
    CPU unless they say otherwise (the main config's 31,250 steps would compile under ``auto``)."""
    base = load_protocol(ROOT / "protocols" / "singh2024" / "main.yaml")
    data = base.resolved()
    train = {"compile": False, "device": "cpu", **train}
    protocol = base.model_validate({**data, "clamps": list(clamps), "train": {**data["train"], **train}})
    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    model = build_model(cfg, 0)
    forward = make_forward(protocol, task, cfg)
    update = make_update(protocol, forward, model, make_optimizer(protocol, model))
    bs = protocol.train.batch_size

    def step(i: int) -> None:
        update(task.train_batch(0, i, bs), i)

    return Stepper(step, protocol, model, forward, task, cfg)


def chunk_rates(steppers: dict[str, Callable[[int], None]], chunks: int, chunk_steps: int,
                between: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Steps/s of each stepper over ``chunks`` rounds that time every stepper in turn for
    ``chunk_steps`` steps (side by side: load drifts hit every setting alike), after 60 warm-up
    steps each (compiles; nnsight parses its trace once). ``between``: called after each round."""
    for step in steppers.values():
        for i in range(60):
            step(i)
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    i = 1000
    for _ in range(chunks):
        for name, step in steppers.items():
            t = time.perf_counter()
            for _ in range(chunk_steps):
                step(i)
                i += 1
            rates[name].append(chunk_steps / (time.perf_counter() - t))
        if between is not None:
            between()
    return rates
