"""Crash safety: a run killed with SIGKILL at random points leaves no corrupt file, and the
resumed run's metrics are bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from safetensors.torch import load_file

from optolab.model.checkpoint import list_checkpoints

from .conftest import fewshot_protocol, write_protocol


def _assert_intact(run: Path) -> None:
    """Everything a reader (or a resume) opens parses; only the jsonl's last line may be torn."""
    for f in run.glob("*.json"):
        json.loads(f.read_text())
    if (run / "protocol.yaml").exists():
        yaml.safe_load((run / "protocol.yaml").read_text())
    for step in list_checkpoints(run / "checkpoints"):
        stem = run / "checkpoints" / f"step_{step:08d}"
        json.loads(stem.with_suffix(".json").read_text())
        assert load_file(str(stem.with_suffix(".safetensors")))
        load_file(str(stem.parent / f"{stem.name}.optim.safetensors"))
    if (run / "metrics.jsonl").exists():
        lines = (run / "metrics.jsonl").read_text().splitlines()
        for line in lines[:-1]:
            json.loads(line)


def _segments(run: Path) -> int:
    try:
        return len(json.loads((run / "meta.json").read_text())["segments"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_a_run_killed_at_random_points_resumes_to_bit_identical_metrics(tmp_path):
    data = fewshot_protocol(steps=1500)
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 50}, "keep": 3}
    data["measures"]["schedule"] = {"unit": "steps", "every": 25}
    path = write_protocol(tmp_path, data)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "optolab", "run", str(path), "--out", str(out), "--no-progress"]
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        before = _segments(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _segments(out) == before and proc.poll() is None:  # wait until it trains (or resumes)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is not None:
            break  # it finished first
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        _assert_intact(out)
        if (out / "summary.json").exists():
            break  # the kill came after training ended, while the figures were drawn
    assert kills >= 2, "the run finished before it could be killed twice; lengthen it"
    if not (out / "summary.json").exists():
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    _assert_intact(out)
    assert json.loads((out / "meta.json").read_text())["status"] == "finished"
    assert len(json.loads((out / "meta.json").read_text())["segments"]) >= kills

    from optolab.api import run
    from optolab.protocol.loader import load_protocol

    run(load_protocol(path), tmp_path / "solo", progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet"),
                                  pd.read_parquet(tmp_path / "solo" / "metrics.parquet"))
    a = load_file(str(out / "checkpoints" / "step_00001500.safetensors"))
    b = load_file(str(tmp_path / "solo" / "checkpoints" / "step_00001500.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
