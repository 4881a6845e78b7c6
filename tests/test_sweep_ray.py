"""The Ray executor: a local Ray instance started by the test, and addresses nobody answers."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import yaml

from optolab.cli import main

from .conftest import fewshot_protocol, write_protocol

pytest.importorskip("ray")  # `make test` installs optolab[ray]; elsewhere the extra is optional


def _sweep(tmp_path) -> str:
    write_protocol(tmp_path, fewshot_protocol(steps=30), "base.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_ray", "protocol": "base.yaml", "seeds": [0, 1], "reference": "slow",
        "conditions": [{"name": "slow"}, {"name": "fast", "set": {"train.lr": 3e-3}}]}, sort_keys=False))
    return str(path)


def test_a_sweep_on_a_local_ray_instance_equals_the_local_executor(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep = _sweep(tmp_path)
    assert main(["sweep", sweep, "--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    assert "4 runs trained, 0 already finished, 0 failed" in capsys.readouterr().out
    assert not list((tmp_path / "ray").glob(".probe-*"))  # the shared-storage probe cleans up
    assert main(["sweep", sweep, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    for rid in ("slow_s0", "slow_s1", "fast_s0", "fast_s1"):
        a = pd.read_parquet(tmp_path / "ray" / rid / "metrics.parquet")
        b = pd.read_parquet(tmp_path / "local" / rid / "metrics.parquet")
        pd.testing.assert_frame_equal(a, b)
    # finished runs are skipped without starting Ray at all
    assert main(["sweep", sweep, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert "0 runs trained, 4 already finished" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "ray")]) == 0
    conditions = pd.read_csv(tmp_path / "ray" / "conditions.csv")
    assert set(conditions.group) == {"slow", "fast"}


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_unreachable_ray_address_is_one_line_within_30_s_and_loses_nothing(tmp_path, capsys, monkeypatch, how):
    sweep, out = _sweep(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["sweep", sweep, "--out", str(out), "--executor", "ray"]
    if how == "flag":
        args += ["--address", "127.0.0.1:1"]
    else:
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    start = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip()
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in err and "--address" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, nothing lost


def test_a_malformed_ray_address_is_refused(tmp_path, capsys):
    assert main(["sweep", _sweep(tmp_path), "--out", str(tmp_path / "o"), "--executor", "ray",
                 "--address", "not an address"]) == 2
    assert "is not host:port" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sweep_json_records_every_run(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep = _sweep(tmp_path)
    assert main(["sweep", sweep, "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    runs = json.loads((tmp_path / "o" / "sweep.json").read_text())["runs"]
    assert runs["fast_s1"] == {"condition": "fast", "point": {}, "seed": 1, "group": "fast"}
