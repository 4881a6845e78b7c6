"""A real Ray cluster: a head started with ``ray start`` on 127.0.0.1 (token authentication on,
as Ray does by default), a sweep sent to it with ``--address``. Without the token the refusal is
one line saying what to set; with ``RAY_AUTH_MODE=token`` the sweep trains. The head's processes
are stopped by their process ids (``ray stop`` would stop every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import fewshot_protocol, write_protocol

pytest.importorskip("ray")
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(temp_dir: str) -> set[int]:
    """Every process whose command line names ``temp_dir``, and their descendants."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry.name)] = ppid
        if temp_dir in cmd:
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are length-limited
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    started = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                              f"--temp-dir={temp_dir}"], capture_output=True, text=True, env=env, timeout=120)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        pids = _processes_of(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        while _processes_of(temp_dir) and time.monotonic() - t0 < 10:
            time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not _processes_of(temp_dir), "the Ray head outlived the test"


def test_a_sweep_on_a_real_cluster_says_what_to_set_and_then_trains(ray_head, tmp_path):
    protocol = write_protocol(tmp_path, fewshot_protocol(steps=5))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "cluster", "protocol": protocol.name, "seeds": [0, 1]}))
    cmd = [sys.executable, "-m", "optolab", "sweep", str(sweep), "--out", str(tmp_path / "out"),
           "--executor", "ray", "--address", ray_head]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "RAY_AUTH_MODE=token" in message, message
    assert not (tmp_path / "out").exists()  # refused before anything is written
    trained = subprocess.run(cmd, capture_output=True, text=True, env={**env, "RAY_AUTH_MODE": "token"},
                             timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "2 runs trained" in trained.stdout
    for seed in (0, 1):
        assert (tmp_path / "out" / f"base_s{seed}" / "summary.json").is_file()
