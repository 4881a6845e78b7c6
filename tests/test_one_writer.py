"""One writer per run directory: a second writer is refused in one line (exit 2), a lock left by a
dead process is taken over, ``--overwrite`` deletes only what optolab wrote, and a killed sweep
leaves no worker behind and resumes to the rows of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.core.lock import LOCK_NAME, DirLock, holder
from optolab.protocol.loader import load_protocol
from optolab.training.trainer import train

from .conftest import fewshot_protocol, write_protocol

CLI = [sys.executable, "-m", "optolab"]


def _wait(condition, timeout: float = 120.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


def _slow_protocol(tmp_path: Path, steps: int = 400, name: str = "p.yaml") -> Path:
    data = fewshot_protocol(steps=steps)
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 50}}
    data["measures"]["schedule"] = {"unit": "steps", "every": 50}
    return write_protocol(tmp_path, data, name)


def _rows(run: Path) -> pd.DataFrame:
    df = pd.read_parquet(run / "metrics.parquet")
    return df.sort_values(["step", "split", "metric", "layer", "head", "src_layer", "src_head"]).reset_index(drop=True)


def test_a_second_writer_is_refused_in_one_line_and_the_first_is_unharmed(tmp_path):
    protocol = _slow_protocol(tmp_path, steps=3000)  # long enough to outlast a second start-up
    out = tmp_path / "run"
    first = subprocess.Popen([*CLI, "run", str(protocol), "--out", str(out), "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (out / "metrics.jsonl").is_file(), what="the first run to start writing")
        second = subprocess.run([*CLI, "run", str(protocol), "--out", str(out), "--no-progress"],
                                capture_output=True, text=True)
        assert second.returncode == 2
        message = second.stderr.strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message
        assert f"pid {first.pid}" in message and "another optolab process" in message
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()
    whole = tmp_path / "whole"
    train(load_protocol(protocol), whole, progress=False)
    pd.testing.assert_frame_equal(_rows(out), _rows(whole))  # no row written twice


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder_code = ("import time, sys; from optolab.core.lock import DirLock; DirLock(sys.argv[1]); "
                   "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", holder_code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OptolabError, match=f"pid {proc.pid}"):
            DirLock(out)
    finally:
        proc.kill()
        proc.wait()
    assert holder(out)["pid"] == proc.pid  # its record is still there, its lock is not
    with DirLock(out):
        assert holder(out)["pid"] == os.getpid()
    train(load_protocol(_slow_protocol(tmp_path, steps=10)), out, progress=False)  # and a run can write


def test_overwrite_deletes_only_what_optolab_wrote(tmp_path, capsys):
    protocol = _slow_protocol(tmp_path, steps=10)
    out = tmp_path / "run"
    assert main(["run", str(protocol), "--out", str(out), "--no-progress"]) == 0
    (out / "notes.txt").write_text("my notes")
    before = sorted(p.name for p in out.iterdir())
    assert main(["run", str(protocol), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "--overwrite deletes only" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing was deleted
    (out / "notes.txt").unlink()
    assert main(["run", str(protocol), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert (out / "summary.json").is_file()
    # a folder that is not a run at all is refused as before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "protocol.txt").write_text("x")
    assert main(["run", str(protocol), "--out", str(other), "--overwrite", "--no-progress"]) == 2
    assert [p.name for p in other.iterdir()] == ["protocol.txt"]  # not even a lock file


def test_a_killed_sweep_leaves_no_worker_and_resumes_to_the_uninterrupted_rows(tmp_path):
    protocol = _slow_protocol(tmp_path, steps=600)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "kill", "protocol": protocol.name, "seeds": [0, 1]}))
    out = tmp_path / "out"
    cmd = [*CLI, "sweep", str(sweep), "--out", str(out), "--workers", "2", "--pack", "off"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = [out / "base_s0", out / "base_s1"]

    def workers() -> list[int]:
        pids = [(holder(r) or {}).get("pid") for r in runs]
        return pids if all(pids) and all(p != parent.pid for p in pids) and all(
            (r / "checkpoints").is_dir() and any((r / "checkpoints").glob("step_00000050*")) for r in runs) else []

    _wait(lambda: workers() or parent.poll() is not None, what="both workers to checkpoint")
    pids = workers()
    assert pids and parent.poll() is None, "the sweep ended before it could be killed; make the runs longer"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    _wait(lambda: not any(_alive(p) for p in pids), timeout=15, what="the workers to die with their parent")
    assert all(not (r / "summary.json").exists() for r in runs)  # they were stopped mid-run
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for seed, run in enumerate(runs):
        whole = tmp_path / f"whole{seed}"
        train(load_protocol(protocol).model_copy(update={"seeds": load_protocol(protocol).seeds.model_copy(
            update={"init": seed, "data": seed})}), whole, progress=False)
        pd.testing.assert_frame_equal(_rows(run), _rows(whole))


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    sweep = tmp_path / "sweep.yaml"
    write_protocol(tmp_path, fewshot_protocol(steps=5))
    sweep.write_text(yaml.safe_dump({"name": "two", "protocol": "p.yaml", "seeds": [0]}))
    with DirLock(out, "sweep"):  # as a running sweep holds it, from another process
        code = ("import sys; from optolab.cli import main; sys.exit(main(sys.argv[1:]))")
        result = subprocess.run([sys.executable, "-c", code, "sweep", str(sweep), "--out", str(out)],
                                capture_output=True, text=True)
    assert result.returncode == 2 and "another optolab process" in result.stderr
    assert LOCK_NAME in {p.name for p in out.iterdir()} and not (out / "sweep.json").exists()
