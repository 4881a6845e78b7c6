"""Experiment trackers (optolab.training.trackers): a run's metrics rows and figures in
TensorBoard and W&B (offline), off by default, not part of a run's identity, never costing a
result."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from optolab.api import run
from optolab.core.errors import OptolabError
from optolab.protocol.loader import validate_protocol
from optolab.training import trackers
from optolab.training.trainer import train

from .conftest import fewshot_protocol

torch.set_num_threads(1)


def _protocol(track: list[str]):
    data = fewshot_protocol(steps=20)
    data["train"]["track"] = track
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 10}}
    return validate_protocol(data)


def test_tensorboard_gets_every_eval_and_the_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    run(_protocol(["tensorboard"]), out, progress=False)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    split = json.loads((out / "summary.json").read_text())["main_split"]
    loss = acc.Scalars(f"{split}/loss")
    metrics = pd.read_parquet(out / "metrics.parquet").to_dict("records")
    steps = sorted({m["step"] for m in metrics})
    assert [e.step for e in loss] == steps  # every eval, at its step
    want = {m["step"]: m["value"] for m in metrics if m["split"] == split and m["metric"] == "loss"}
    assert all(abs(e.value - want[e.step]) < 1e-6 for e in loss)
    assert any(t.startswith(f"{split}/induction_strength/L1H") for t in tags["scalars"])
    assert "figures/loss" in tags["images"]


def test_wandb_logs_offline_into_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "r"
    run(_protocol(["wandb"]), out, progress=False)
    logs = list((out / "wandb").glob("offline-run-*"))
    assert logs and any(p.suffix == ".wandb" for d in logs for p in d.iterdir())


def test_tracking_is_not_part_of_a_runs_identity_and_a_broken_tracker_costs_nothing(tmp_path, monkeypatch):
    out = tmp_path / "r"
    train(_protocol([]), out, progress=False, stop_after=10)

    def broken(self, step, rows):
        raise OSError("no space left on device")

    monkeypatch.setattr(trackers.TensorBoard, "scalars", broken)
    result = train(_protocol(["tensorboard"]), out, progress=False)  # resumes: same run
    assert result.summary and json.loads((out / "meta.json").read_text())["tracker_failures"][0].startswith(
        "tensorboard: OSError")
    whole = train(_protocol([]), tmp_path / "whole", progress=False)
    assert result.summary["final"] == whole.summary["final"]


def test_a_missing_tracker_library_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a))
    with pytest.raises(OptolabError) as e:
        train(_protocol(["wandb"]), tmp_path / "r", progress=False)
    assert e.value.field == "train.track" and "optolab[track]" in e.value.fix
    assert not (tmp_path / "r").exists()
