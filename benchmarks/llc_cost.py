"""What the stage signals cost a run (issue 18): the LLC at checkpoints and per-example losses,
as a fraction of the run's training time and of its disk.

Trains one protocol (default: the quickstart, 6,250 steps) three times, side by side in one
process each on one core: without per-example losses or the LLC; with per-example losses (the
default); with both (``measures.llc`` at every checkpoint, the protocol's own settings or the
defaults). Reports each run's wall time, the time spent in evals and in the LLC (meta.json), and
the bytes of ``per_example/``, ``measures/llc/`` and the whole run directory (checkpoints apart).

    python benchmarks/llc_cost.py [--protocol protocols/quickstart.yaml] [--out /tmp/llc_cost]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def variant(base: dict, folder: Path, name: str, per_example: bool, llc) -> Path:
    data = json.loads(json.dumps(base))
    data["name"] = f"{base['name']}_{name}"
    data["measures"] = {**data.get("measures", {}), "per_example": per_example, "llc": llc}
    data["train"] = {**data["train"], "compile": False}  # the eager path: no compile time in the split
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocol", default=str(ROOT / "protocols/quickstart.yaml"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="llc_cost_"))
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.protocol).resolve()
    base = yaml.safe_load(src.read_text())
    if isinstance(base.get("task"), str):
        base["task"] = str((src.parent / base["task"]).resolve())
    llc = base.get("measures", {}).get("llc") or True
    runs = {"plain": variant(base, out, "plain", False, False),
            "per_example": variant(base, out, "per_example", True, False),
            "per_example_llc": variant(base, out, "per_example_llc", True, llc)}
    procs = {k: subprocess.Popen(["taskset", "-c", str(i % 2), sys.executable, "-m", "optolab", "run", str(p),
                                  "--out", str(out / k), "--overwrite", "--no-progress"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, (k, p) in enumerate(runs.items())}
    for k, p in procs.items():
        _, err = p.communicate()
        if p.returncode:
            print(f"{k} failed:\n{err.decode()[-2000:]}", file=sys.stderr)
            return 1
    print(f"protocol: {src.name}, eager, one thread per run ({out})")
    print(f"{'run':<17} {'wall s':>7} {'evals s':>8} {'llc s':>7} {'llc/wall':>9} {'per_example':>12} "
          f"{'llc files':>10} {'run dir*':>10}")
    for k in runs:
        d = out / k
        meta = json.loads((d / "meta.json").read_text())
        wall = meta["wall_time_s"]
        ev = sum(s.get("eval_time_s", 0.0) for s in meta["segments"])
        lt = meta.get("checkpoint_measures_s", 0.0)
        total = du(d) - du(d / "checkpoints")
        print(f"{k:<17} {wall:>7.1f} {ev:>8.1f} {lt:>7.1f} {lt / wall:>9.0%} {du(d / 'per_example') / 1e6:>10.2f}MB "
              f"{du(d / 'measures') / 1e6:>8.2f}MB {total / 1e6:>8.2f}MB")
    print("* the run directory without its checkpoints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
