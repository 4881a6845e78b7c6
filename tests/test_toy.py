"""The a⊗b⊗c toy model (Singh et al. 2024, ANCHORS T6): clamps shorten the plateau."""

from __future__ import annotations

import json

import pytest
import yaml

from optolab.cli import main
from optolab.experiments.toy import time_to_fraction, train_toy


def test_clamping_c_then_b_and_c_learns_faster_and_exactly():
    times = {}
    for name, clamped in {"none": [], "c": ["c"], "bc": ["b", "c"]}.items():
        per_seed = []
        for seed in range(4):
            df = train_toy(dim=12, lr=1.0, iterations=1500, clamped=clamped, seed=seed)
            per_seed.append(time_to_fraction(df.loss, 0.1) or 10**9)
            if clamped:
                for v in clamped:  # a clamped vector never moves off its true value
                    assert df[f"misalign_{v}"].abs().max() < 1e-12
        times[name] = sorted(per_seed)[1]
    assert times["bc"] < times["c"] < times["none"]


def test_toy_protocol_runs_from_yaml_and_writes_a_tidy_run(tmp_path, capsys):
    proto = {"kind": "toy_tensor", "name": "toy", "dim": 8, "iterations": 400, "seeds": [0, 1],
             "conditions": {"none": [], "clamp_c": ["c"]}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(proto))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "clamp_c: median" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["conditions"]) == {"none", "clamp_c"}
    for name in ("protocol.yaml", "meta.json", "metrics.csv", "figures/loss.png"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.parametrize("bad, words", [
    ({"conditions": {"all": ["a", "b", "c"]}}, "nothing is left to learn"),
    ({"conditions": {"x": ["d"]}}, "conditions.x.0"),
    ({"dim": 0}, "dim"),
    ({"lr": -1}, "lr"),
    ({"iterations": 10**9}, "iterations"),
    ({"colour": "red"}, "colour"),
])
def test_bad_toy_protocols_are_refused_in_one_line(tmp_path, capsys, bad, words):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"kind": "toy_tensor", "name": "toy", **bad}))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _toy(tmp_path, **changes):
    proto = {"kind": "toy_tensor", "name": "toy", "dim": 6, "iterations": 60, "seeds": [0],
             "conditions": {"none": []}, **changes}
    path = tmp_path / f"toy{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(proto))
    return str(path)


def test_a_folder_with_the_users_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", _toy(tmp_path), "--out", str(out)]) == 0
    (out / "figures" / "my_plot.png").write_text("mine")  # a user's file among a toy run's
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        assert main(["run", _toy(tmp_path), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "figures/my_plot.png" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    own = tmp_path / "mine"
    own.mkdir()
    (own / "metrics.csv").write_text("my,data\n")  # one of the toy's names, but no toy run here
    assert main(["run", _toy(tmp_path), "--out", str(own), "--overwrite"]) == 2
    assert "no toy run's protocol.yaml" in capsys.readouterr().err
    assert (own / "metrics.csv").read_text() == "my,data\n"


def test_another_protocol_needs_overwrite_which_replaces_only_the_toys_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", _toy(tmp_path), "--out", str(out)]) == 0
    first = (out / "summary.json").read_text()
    assert main(["run", _toy(tmp_path), "--out", str(out)]) == 0  # the same protocol: its finished run
    assert (out / "summary.json").read_text() == first
    capsys.readouterr()
    assert main(["run", _toy(tmp_path, iterations=80), "--out", str(out)]) == 2
    assert "different protocol" in capsys.readouterr().err
    assert main(["run", _toy(tmp_path, iterations=80), "--out", str(out), "--overwrite"]) == 0
    assert yaml.safe_load((out / "protocol.yaml").read_text())["iterations"] == 80
