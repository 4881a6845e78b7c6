"""Re-run the numerically sensitive tests under other CPU kernel choices (part of ``make test``).

Rules:
- numpy's OpenBLAS and torch pick their kernels by CPU at run time, so a tolerance that holds
  with one kernel set can fail with another (c9baccf's loss-trajectory test passed with
  OpenBLAS's Haswell kernels and failed with its SkylakeX ones on the same machine). Every test
  marked ``numerics`` (measures, statistics, the loss trajectory, phase detection, clamp maths,
  and the equality of the training paths) runs again here with the kernels forced to other
  choices this CPU can execute:

  =========  =============================================================================
  run        environment
  =========  =============================================================================
  avx512     ``OPENBLAS_CORETYPE=SkylakeX`` (numpy's AVX-512 kernels)
  avx2       ``OPENBLAS_CORETYPE=Haswell``, ``ATEN_CPU_CAPABILITY=avx2`` (torch's vectorised
             kernels), ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (torch's matrix products)
  =========  =============================================================================

  A choice the CPU cannot run (no ``avx512f`` or ``avx2`` in ``/proc/cpuinfo``, or not x86)
  is skipped with a line saying so: forcing it would crash, not test. The default kernels were
  already exercised by the main run.
- Exit status: 0 when every run passed, 1 otherwise (the failing run's environment is printed).

Run: ``python tests/kernel_choices.py [pytest args]`` (``make test`` runs it after the suite).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

CHOICES = {
    "avx512": ("avx512f", {"OPENBLAS_CORETYPE": "SkylakeX"}),
    "avx2": ("avx2", {"OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2",
                      "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    flags = cpu_flags() if x86 else set()
    failed = []
    for name, (flag, env) in CHOICES.items():
        if flag not in flags:
            print(f"[kernels] {name}: skipped, this CPU has no {flag}" + ("" if x86 else " (not x86-64)"))
            continue
        shown = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"[kernels] {name}: {shown}", flush=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider", "tests", *argv]
        if subprocess.run(cmd, cwd=root, env={**os.environ, **env}).returncode:
            failed.append(shown)
    for shown in failed:
        print(f"[kernels] FAILED under {shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
