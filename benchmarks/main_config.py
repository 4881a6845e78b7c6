"""The Singh et al. main config (2 layers × 8 heads, d_model 64, batch 32) as a benchmark's
training step: the trainer's own update (``make_update``: compiled when ``train.compile``), on the
task's batches for data seed 0. Shared by ``train_speed.py`` and ``clamp_overhead.py``."""

from __future__ import annotations

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
