"""Start-up cost: ``optolab --help`` wall time (target < 1 s) and what the optolab pytest plugin
adds to a one-test pytest session (target < 0.2 s), medians over repeated runs.

    python benchmarks/imports.py                  # this checkout
    python benchmarks/imports.py --root OTHER     # another checkout of optolab (e.g. a git worktree of main)

Each figure is a whole process, timed from outside; the plugin's cost is the one-test session
with the plugin minus the same session with ``-p no:optolab``, run alternately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(cmd: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="optolab checkout to time")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": args.root}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
        help_cmd = [sys.executable, "-m", "optolab", "--help"]
        with_plugin = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_one.py"]
        without = with_plugin[:3] + ["-p", "no:optolab"] + with_plugin[3:]
        wall(help_cmd, env, tmp)  # warm the file cache
        helps, plugged, bare = [], [], []
        for _ in range(args.repeats):
            helps.append(wall(help_cmd, env, tmp))
            plugged.append(wall(with_plugin, env, tmp))
            bare.append(wall(without, env, tmp))
    print(f"optolab at {args.root}")
    print(f"optolab --help: median {statistics.median(helps):.3f} s (min {min(helps):.3f}, max {max(helps):.3f}); "
          "target < 1 s")
    cost = statistics.median(p - b for p, b in zip(plugged, bare))
    print(f"one-test pytest session: {statistics.median(plugged):.3f} s with the plugin, "
          f"{statistics.median(bare):.3f} s without; the plugin costs {cost:+.3f} s (median of paired differences); target < 0.2 s")


if __name__ == "__main__":
    main()
