"""Per-example losses: the loss at every scored position of the eval splits, kept at every eval
in compact arrays beside the metrics (``RUN_DIR/per_example/``), not in ``metrics.jsonl``.

Rules:
- One file per eval split, ``<split>.f16``: rows of float16 losses appended at each eval, every
  row the same positions (the first ``measures.per_example_max`` scored positions of the fixed
  eval set, sequence by sequence). ``index.jsonl`` has one line per eval, ``{"step", "sequences",
  "width": {split: n}}``, written after the rows, so a row without an index line (a kill between
  the two) is ignored and cut on resume.
- Resuming from the checkpoint at step ``s`` keeps the evals at steps ``<= s`` and cuts the rest,
  as :meth:`~optolab.training.rundir.RunDir.truncate_metrics` does for the metrics: a resumed run's
  arrays equal the uninterrupted run's.
- float16 keeps a loss to 3 significant digits, enough for trajectories and stages: 4 splits ×
  4,096 positions × 200 evals is 6.6 MB.
- :func:`load` gives ``(steps, sequences, {split: array [eval, position]})`` (float32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from optolab.core.files import read_jsonl_rows

FOLDER = "per_example"


def _folder(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def append(run_dir: Path, step: int, sequences: int, losses: dict[str, torch.Tensor]) -> None:
    """One eval's per-position losses (see the module rules)."""
    folder = _folder(run_dir)
    folder.mkdir(exist_ok=True)
    for split, values in losses.items():
        with (folder / f"{split}.f16").open("ab") as f:
            f.write(values.numpy().astype("<f2").tobytes())
    with (folder / "index.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "sequences": sequences,
                            "width": {s: int(v.numel()) for s, v in losses.items()}}) + "\n")


def _index(folder: Path) -> list[dict]:
    # a torn line ends the index: what follows it was never written
    return read_jsonl_rows(folder / "index.jsonl", stop_at_torn=True, fix="delete that line (evals after the "
                           "last checkpoint are recomputed on resume), or pass --overwrite to redo the run.")


def check(run_dir: Path) -> None:
    """Refuse (one line) an index a resume could not cut."""
    _index(_folder(run_dir))


def truncate(run_dir: Path, last_step: int) -> None:
    """Keep the evals at steps ``<= last_step`` (and nothing a kill left half written)."""
    folder = _folder(run_dir)
    if not folder.is_dir():
        return
    kept = [r for r in _index(folder) if r["step"] <= last_step]
    widths: dict[str, int] = {}
    for r in kept:
        for split, n in r["width"].items():
            widths[split] = widths.get(split, 0) + n
    for f in folder.glob("*.f16"):
        size = 2 * widths.get(f.stem, 0)
        if f.stat().st_size > size:
            os.truncate(f, size)
    tmp = folder / "index.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, folder / "index.jsonl")


def load(run_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(steps, sequences, {split: [eval, position] float32})`` of a run's per-example losses."""
    folder = _folder(run_dir)
    index = _index(folder)
    steps = np.array([r["step"] for r in index], dtype=np.int64)
    sequences = np.array([r["sequences"] for r in index], dtype=np.int64)
    arrays = {}
    for split in dict.fromkeys(s for r in index for s in r["width"]):
        widths = {r["width"].get(split) for r in index}
        if len(widths) != 1:
            continue  # the positions changed (another eval size): not one trajectory
        width = widths.pop()
        raw = np.fromfile(folder / f"{split}.f16", dtype="<f2")[: len(index) * width]
        arrays[split] = raw.reshape(-1, width).astype(np.float32)
    return steps, sequences, arrays
