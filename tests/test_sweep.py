"""Sweeps: expansion, validation, the local executor (skips finished runs), and the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from optolab.cli import main
from optolab.experiments.sweep import load_sweep

from .conftest import fewshot_protocol, write_protocol


def _sweep(tmp_path, **extra) -> str:
    write_protocol(tmp_path, fewshot_protocol(steps=20), "base.yaml")
    data = {"name": "tiny", "protocol": "base.yaml", "seeds": [0, 1], "reference": "lr1e-3",
            "conditions": [{"name": "lr1e-3"}, {"name": "lr3e-3", "set": {"train.lr": 3e-3}}], **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_expansion_gives_stable_readable_ids_and_applies_overrides(tmp_path):
    _, runs = load_sweep(_sweep(tmp_path, grid={"task.n_labels": [5, 6]}))
    assert sorted(runs) == sorted(f"{c}__n_labels-{n}_s{s}" for c in ("lr1e-3", "lr3e-3")
                                  for n in (5, 6) for s in (0, 1))
    r = runs["lr3e-3__n_labels-6_s1"]
    assert r.protocol.train.lr == 3e-3 and r.protocol.task.n_labels == 6
    assert r.protocol.seeds.init == r.protocol.seeds.data == 1 and r.group == "lr3e-3__n_labels-6"


def test_a_top_level_set_applies_to_every_run_and_a_condition_set_wins(tmp_path):
    _, runs = load_sweep(_sweep(tmp_path, set={"train.compile": True, "train.lr": 2e-3}))
    assert all(r.protocol.train.compile for r in runs.values())
    assert runs["lr1e-3_s0"].protocol.train.lr == 2e-3 and runs["lr3e-3_s0"].protocol.train.lr == 3e-3


@pytest.mark.parametrize("extra, words", [
    ({"grid": {"task.n_lables": [5]}}, "did you mean 'n_labels'"),
    ({"grid": {"train.lr": []}}, "has no values"),
    ({"conditions": [{"name": "a"}, {"name": "a"}]}, "appear more than once"),
    ({"reference": "nope"}, "is not a condition name"),
    ({"grid": {"task.n_labels": [1]}}, "task.n_labels"),
])
def test_bad_sweeps_are_refused_in_one_line(tmp_path, capsys, extra, words):
    assert main(["sweep", _sweep(tmp_path, **extra), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_sweep_runs_in_parallel_skips_finished_runs_and_reports(tmp_path, capsys):
    sweep, out = _sweep(tmp_path), tmp_path / "out"
    assert main(["sweep", sweep, "--out", str(out), "--workers", "2"]) == 0
    assert "4 runs trained" in capsys.readouterr().out
    stamp = (out / "lr1e-3_s0" / "summary.json").stat().st_mtime_ns
    assert main(["sweep", sweep, "--out", str(out), "--workers", "2"]) == 0
    assert "0 runs trained, 4 already finished" in capsys.readouterr().out
    assert (out / "lr1e-3_s0" / "summary.json").stat().st_mtime_ns == stamp  # not recomputed
    # the same run alone gives the same numbers as inside the sweep
    solo = tmp_path / "solo"
    _, runs = load_sweep(sweep)
    from optolab.api import run

    run(runs["lr3e-3_s1"].protocol, solo, progress=False)
    a = pd.read_parquet(solo / "metrics.parquet")
    b = pd.read_parquet(out / "lr3e-3_s1" / "metrics.parquet")  # trained in a seed ensemble (--pack auto)
    assert (a.value - b.value).abs().max() < 1e-5
    first, second = json.loads((out / "sweep.json").read_text())["invocations"]
    assert sorted(map(sorted, first["jobs"])) == [["lr1e-3_s0", "lr1e-3_s1"], ["lr3e-3_s0", "lr3e-3_s1"]]
    assert second["jobs"] == []  # the re-run had nothing to train
    assert main(["report", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and {"onset", "midpoint", "plateau", "final_loss"} <= set(summary.columns)
    conditions = pd.read_csv(out / "conditions.csv")
    assert list(conditions.group) == ["lr1e-3", "lr3e-3"] and (conditions.seeds == 2).all()
    assert {"midpoint_ratio", "t05_median", "t05_ratio_ci_low"} <= set(conditions.columns)
    assert "# Sweep tiny" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table" in html  # self-contained
    for fig in ("loss_curves", "head_scores", "times"):
        assert (out / "figures" / f"{fig}.png").is_file()
    assert summary["score"].str.startswith("induction_strength L1H").all()
    assert "score_midpoint_found" in conditions.columns


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no sweep.json" in capsys.readouterr().err


def test_a_sweep_killed_mid_run_resumes_without_recomputing_and_matches_an_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from optolab.api import run

    base = fewshot_protocol(steps=400)
    base["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 20}}
    write_protocol(tmp_path, base, "base.yaml")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "kill", "protocol": "base.yaml", "seeds": [0, 1]}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "optolab.cli", "sweep", str(sweep), "--out", str(out), "--workers", "1",
           "--pack", "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "base_s1" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (second.is_dir() and any(second.glob("step_00000060.safetensors"))):  # mid-way through run 2
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "base_s0" / "summary.json").is_file() and not (out / "base_s1" / "summary.json").exists()
    first = (out / "base_s0" / "summary.json").stat().st_mtime_ns
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert (out / "base_s0" / "summary.json").stat().st_mtime_ns == first  # finished run not recomputed
    _, runs = load_sweep(sweep)
    run(runs["base_s1"].protocol, tmp_path / "solo", progress=False)
    resumed = pd.read_parquet(out / "base_s1" / "metrics.parquet")
    solo = pd.read_parquet(tmp_path / "solo" / "metrics.parquet")
    pd.testing.assert_frame_equal(resumed, solo)  # bit-identical metrics


def test_a_pool_worker_killed_mid_run_fails_that_run_only_and_a_rerun_resumes_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from optolab.api import run

    base = fewshot_protocol(steps=1000)  # long enough to be mid-run on a loaded machine
    base["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 20}}
    write_protocol(tmp_path, base, "base.yaml")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({  # the long run goes first; the short ones share the other worker
        "name": "killw", "protocol": "base.yaml", "seeds": [0],
        "conditions": [{"name": "long"}, {"name": "short", "set": {"train.steps": 30}},
                       {"name": "short2", "set": {"train.steps": 30, "train.lr": 3e-3}}]}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "optolab", "sweep", str(sweep), "--out", str(out), "--workers", "2",
           "--pack", "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    long_ckpt = out / "long_s0" / "checkpoints"
    deadline = time.monotonic() + 120
    while not ((out / "short_s0" / "summary.json").is_file() and (out / "short2_s0" / "summary.json").is_file()
               and any(long_ckpt.glob("step_00000060.safetensors"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before a worker was killed"
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in children:  # the pool's workers (one is mid-way through the long run)
        os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "long_s0: failed" in err and "Traceback" not in err
    assert not (out / "long_s0" / "summary.json").exists()
    stamps = {r: (out / r / "summary.json").stat().st_mtime_ns for r in ("short_s0", "short2_s0")}
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0 and "1 runs trained, 2 already finished" in rerun.stdout
    assert stamps == {r: (out / r / "summary.json").stat().st_mtime_ns for r in stamps}  # not recomputed
    _, runs = load_sweep(sweep)
    run(runs["long_s0"].protocol, tmp_path / "solo", progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "long_s0" / "metrics.parquet"),
                                  pd.read_parquet(tmp_path / "solo" / "metrics.parquet"))


def test_plan_jobs_packs_ensembles_only_of_compatible_runs(tmp_path):
    from optolab.experiments.sweep import plan_jobs

    pattern = {"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [0], "to": "previous_token"}
    layer = {"kind": "layer_clamp", "layer": 0}
    sweep = _sweep(tmp_path, seeds=list(range(4)), reference="a", conditions=[
        {"name": "a"}, {"name": "pattern", "set": {"clamps": [pattern]}},
        {"name": "layer", "set": {"clamps": [layer]}}, {"name": "lr", "set": {"train.lr": 3e-3}},
        {"name": "frozen", "set": {"clamps": [{"kind": "freeze", "param": "blocks.0.attn.W_Q"}]}}])
    _, runs = load_sweep(sweep)
    todo = list(runs)

    def conditions(job):
        return [runs[r].condition for r in job]

    jobs = plan_jobs(runs, todo, tmp_path / "out", pack="auto", max_pack=8, workers=2)
    packed = [conditions(j) for j in jobs if len(j) > 1]
    # a and pattern need the same (main) pass: mixed, each condition's seeds together; layer has
    # a shifted pass and lr other settings: apart; frozen never packs
    assert sorted(packed) == sorted([["a"] * 4 + ["pattern"] * 4, ["layer"] * 4, ["lr"] * 4])
    assert sorted(r for j in jobs if len(j) == 1 for r in j) == sorted(f"frozen_s{s}" for s in range(4))
    seeds = plan_jobs(runs, todo, tmp_path / "out", pack="seeds", max_pack=8, workers=2)
    assert all(len(set(conditions(j))) == 1 for j in seeds)
    assert sorted(len(j) for j in seeds if len(j) > 1) == [4, 4, 4, 4]
    small = plan_jobs(runs, todo, tmp_path / "out", pack="auto", max_pack=3, workers=1)
    assert max(map(len, small)) == 3
    assert all(len(j) == 1 for j in plan_jobs(runs, todo, tmp_path / "out", pack="off", max_pack=8, workers=2))


def test_plan_jobs_splits_a_group_into_whole_waves_of_near_equal_jobs(tmp_path):
    from optolab.experiments.sweep import plan_jobs

    sweep = _sweep(tmp_path, seeds=list(range(14)), reference=None, conditions=[{"name": "a"}])
    _, runs = load_sweep(sweep)
    # 14 runs of at most 5: 3 jobs would leave the second wave on 2 workers half empty; 4 do not
    jobs = plan_jobs(runs, list(runs), tmp_path / "out", pack="auto", max_pack=5, workers=2)
    assert sorted(map(len, jobs)) == [3, 3, 4, 4] and sorted(r for j in jobs for r in j) == sorted(runs)
    assert [len(j) for j in plan_jobs(runs, list(runs), tmp_path / "out", pack="auto", max_pack=16,
                                      workers=2)] == [7, 7]
    assert len(plan_jobs(runs, list(runs), tmp_path / "out", pack="auto", max_pack=5, workers=1)) == 3


def test_a_dry_run_lists_the_runs_and_how_they_would_pack_and_writes_nothing(tmp_path, capsys):
    pattern = {"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [0], "to": "previous_token"}
    sweep = _sweep(tmp_path, conditions=[{"name": "lr1e-3"}, {"name": "pattern", "set": {"clamps": [pattern]}}])
    out = tmp_path / "out"
    assert main(["sweep", sweep, "--out", str(out), "--workers", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "trains as 1 job(s) on 1 worker(s) (--pack auto):" in text
    assert "  lr1e-3_s0 + lr1e-3_s1 + pattern_s0 + pattern_s1" in text
    assert main(["sweep", sweep, "--out", str(out), "--workers", "1", "--dry-run", "--pack", "seeds"]) == 0
    assert "trains as 2 job(s)" in capsys.readouterr().out
    assert main(["sweep", sweep, "--out", str(out), "--dry-run", "--max-pack", "0"]) == 2
    assert "--max-pack" in capsys.readouterr().err
    assert not out.exists()


def test_the_cost_calibration_keeps_late_windows_inside_its_short_runs():
    # a window starting past the calibration's 8 steps refused every --dry-run of such a sweep
    from optolab.experiments.cost import _short
    from optolab.protocol.loader import validate_protocol

    base = fewshot_protocol(steps=400)
    scale = {"kind": "scale", "site": "blocks.1.attn.hook_attn_scores", "factor": 0.5}
    per = base["train"]["batch_size"]
    data = {**base, "clamps": [{**scale, "heads": [0], "window": {"start": 100, "unit": "steps"}},
                               {**scale, "heads": [1], "window": {"start": 300 * per, "stop": 390 * per}}],
            "data": {"tasks": {"b2": {**base["task"], "burstiness": 2}},
                     "phases": [{"task": "b2", "window": {"start": 200, "unit": "steps"}}]}}
    short = _short(validate_protocol(data), 8, "calib", 0)
    windows = [(c.window.start, c.window.stop) for c in short.clamps]
    assert short.train.total_steps == 8 and windows == [(2, None), (6, 8)]
    assert short.data.phases[0].window.start == 4


def test_dense_evals_train_the_reference_first_then_evaluate_the_others_around_its_drop(tmp_path, capsys):
    sweep = _sweep(tmp_path, dense_evals={"every": 16, "span": [0.5, 1.5], "loss": 1.7})
    out = tmp_path / "out"
    assert main(["sweep", sweep, "--out", str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    jobs = dry.split("trains as")[1].split("then")[0]
    assert "lr1e-3_s0" in jobs and "lr1e-3_s1" in jobs and "lr3e-3" not in jobs
    assert "then 2 run(s) with dense evals" in dry
    assert main(["sweep", sweep, "--out", str(out), "--workers", "2"]) == 0
    invocations = json.loads((out / "sweep.json").read_text())["invocations"]
    assert [sorted(r for job in inv["jobs"] for r in job) for inv in invocations] == [
        ["lr1e-3_s0", "lr1e-3_s1"], ["lr3e-3_s0", "lr3e-3_s1"]]  # the reference first
    ref = pd.read_parquet(out / "lr1e-3_s0" / "metrics.parquet")
    other = pd.read_parquet(out / "lr3e-3_s0" / "metrics.parquet")
    assert len(other.step.unique()) > len(ref.step.unique())  # extra evals around the reference's drop
    extra = sorted(set(other.sequences.unique()) - set(ref.sequences.unique()))
    assert extra and all(s % 16 == 0 for s in extra)
    # a re-run expands the same protocols: everything is finished, nothing is refused
    assert main(["sweep", sweep, "--out", str(out), "--workers", "2"]) == 0
    assert "0 runs trained, 4 already finished" in capsys.readouterr().out
