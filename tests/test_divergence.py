"""Divergence: a NaN/Inf loss or parameter stops the run, says so, and loses nothing."""

from __future__ import annotations

import json

import pandas as pd
import torch
import yaml

from optolab.cli import main
from optolab.model.checkpoint import list_checkpoints
from optolab.tasks.fewshot import FewshotTask

from .conftest import fewshot_protocol, write_protocol


def test_a_nan_mid_run_stops_it_marks_it_failed_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    original = FewshotTask.train_batch

    def poisoned(self, seed, step, batch_size):
        batch = original(self, seed, step, batch_size)
        if step >= 25:  # the data turn bad at step 25
            batch.inputs[0].fill_(float("nan"))
        return batch

    monkeypatch.setattr(FewshotTask, "train_batch", poisoned)
    path = write_protocol(tmp_path, fewshot_protocol(steps=60))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "diverged: the training loss is nan at step 25" in err and "checkpoints up to step 20" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failure"]["step"] == 25
    assert summary["last_checkpoint_step"] == 20
    assert json.loads((out / "meta.json").read_text())["status"] == "failed"
    assert list_checkpoints(out / "checkpoints") == [0, 10, 20]
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / "step_00000020.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics.step.unique()) == [0, 10, 20]  # everything measured before the divergence
    # running it again into the same folder says why it will not
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    assert "diverged" in capsys.readouterr().err


def test_a_sweep_goes_on_past_a_diverging_run_and_the_report_lists_it(tmp_path, capsys):
    write_protocol(tmp_path, fewshot_protocol(steps=20), "base.yaml")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "div", "protocol": "base.yaml", "seeds": [0], "reference": "ok",
        "conditions": [{"name": "ok"}, {"name": "explodes", "set": {"train.lr": 1e30}}]}))
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert "1 runs trained, 0 already finished, 1 failed" in captured.out
    assert "explodes_s0: failed: RunFailed" in captured.err
    assert json.loads((out / "ok_s0" / "summary.json").read_text())["status"] == "finished"
    # a re-run does not retry the diverged run (it would diverge again) and still reports it
    assert main(["sweep", str(sweep), "--out", str(out), "--workers", "1"]) == 1
    assert "diverged earlier" in capsys.readouterr().err
    assert main(["report", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary.loc["explodes_s0", "status"] == "failed" and pd.isna(summary.loc["explodes_s0", "final_loss"])
    assert summary.loc["ok_s0", "status"] == "finished"


def test_the_python_api_raises_run_failed_at_the_first_step(tmp_path):
    import pytest

    from optolab.core.errors import RunFailed
    from optolab.protocol.loader import validate_protocol
    from optolab.training.trainer import train

    with pytest.raises(RunFailed, match="the training loss is nan at step 1"):
        train(validate_protocol(fewshot_protocol(lr=1e30)), tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["status"] == "failed"
    assert list_checkpoints(tmp_path / "r" / "checkpoints") == [0]
