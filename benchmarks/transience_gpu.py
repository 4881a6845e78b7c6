"""Paper-scale transience on one GPU (issue 33, item 3): ``protocols/singh2025/transience.yaml``
(2e7 sequences, 625,000 steps per run) on seeds 0-2 as one ensemble on ``cuda``, against the
paper's numbers. Prepared, not yet run: no GPU was lent to the session that wrote it.

What it does:
- writes ``OUT/transience_paper.yaml`` (a sweep: the protocol, seeds 0-2, one condition, compiled
  steps) and runs ``optolab sweep ... --device cuda --pack seeds`` until ``--budget`` seconds,
  then interrupts it (SIGINT: a sweep dies whole and resumes bit-identically, so the next lease
  runs the same command and goes on from the last checkpoint: 2e6 sequences apart, log-spaced
  early, as the protocol sets);
- prints the wall time, how far each run got, and per run: icl and flip_icl accuracy at their
  peaks (and where) and at the last eval, ciwl and iwl at the last eval, beside the paper's
  single-seed reproduction (ANCHORS §8: icl peaks ~0.77 near 4.4e6 sequences and falls to ~0.54
  by 2e7; flip_icl peaks ~0.69 and falls to ~0.03; ciwl reaches ~0.97). Writes
  ``OUT/transience_paper.json``.

The expected cost (to check on the first run): ~45 steps/s per run on one CPU core (the 12,800-way
output dominates), so ~4 h per run there; on an H200 a 3-member ensemble's step is launch-bound
(docs/speed.md, ensembles stage): expect tens of minutes, i.e. several leases of 15 minutes.

    python benchmarks/transience_gpu.py --out results/transience_paper --budget 780     # on the GPU machine
    python benchmarks/transience_gpu.py --out results/transience_paper --report-only    # anywhere, afterwards
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "protocols" / "singh2025" / "transience.yaml"
PAPER = {"icl_peak": 0.77, "icl_peak_at": 4.4e6, "icl_last": 0.54, "flip_icl_peak": 0.69, "flip_icl_last": 0.03,
         "ciwl_last": 0.97}


def sweep_file(out: Path, seeds: list[int]) -> Path:
    data = {"name": "transience_paper", "protocol": str(PROTOCOL), "seeds": seeds,
            "set": {"train.compile": True}, "conditions": [{"name": "base"}], "run_figures": False}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "transience_paper.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train(out: Path, seeds: list[int], budget: float, device: str) -> float:
    """Run (or resume) the sweep until it ends or ``budget`` seconds pass; its wall seconds."""
    cmd = [sys.executable, "-m", "optolab", "sweep", str(sweep_file(out, seeds)), "--out", str(out / "sweep"),
           "--device", device, "--pack", "seeds", "--workers", "1"]
    t0 = time.monotonic()
    with open(out / "sweep.log", "a") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            p.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)  # the sweep stops whole; its runs resume from their checkpoints
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    return time.monotonic() - t0


def readout(run_dir: Path) -> dict:
    """One run's transience numbers from its metrics (finished or not)."""
    from optolab.experiments.runs import open_run

    m = open_run(run_dir).metrics
    acc = m[m.metric == "acc"]
    out: dict = {"last_sequences": float(acc.sequences.max()) if len(acc) else None}
    for split in ("icl", "flip_icl", "ciwl", "iwl"):
        s = acc[acc.split == split].sort_values("sequences")
        if s.empty:
            continue
        i = s.value.idxmax()
        out[f"{split}_peak"], out[f"{split}_peak_at"] = float(s.value[i]), float(s.sequences[i])
        out[f"{split}_last"] = float(s.value.iloc[-1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/transience_paper")
    ap.add_argument("--budget", type=float, default=780.0, help="seconds of training in this invocation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    wall = None
    if not args.report_only:
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("transience_gpu: no CUDA device here; run it on the GPU machine (or pass --device cpu).",
                      file=sys.stderr)
                return 2
        wall = train(out, args.seeds, args.budget, args.device)
    runs = {}
    for run_dir in sorted((out / "sweep").glob("base_s*")):
        if (run_dir / "protocol.yaml").is_file():
            runs[run_dir.name] = readout(run_dir)
    record = {"wall_s_this_invocation": wall, "paper": PAPER, "runs": runs}
    (out / "transience_paper.json").write_text(json.dumps(record, indent=2))
    cols = ("last_sequences", "icl_peak", "icl_peak_at", "icl_last", "flip_icl_peak", "flip_icl_last", "ciwl_last",
            "iwl_last")
    print(f"wall this invocation: {wall if wall is None else f'{wall / 60:.1f} min'}")
    print("| run | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for name, r in runs.items():
        print(f"| {name} | " + " | ".join("—" if r.get(c) is None else f"{r[c]:.3g}" for c in cols) + " |")
    print("| paper (ANCHORS §8) | 2e+07 | " + " | ".join(
        f"{PAPER[c]:.3g}" if c in PAPER else "—" for c in cols[1:]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
