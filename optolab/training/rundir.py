"""The run directory: everything one run wrote, self-describing.

Layout::

    RUN_DIR/
      protocol.yaml      the resolved protocol (every default filled in)
      meta.json          seeds, package versions, git commit, host, wall time, status
      metrics.jsonl      tidy rows appended (and flushed) as training goes:
                         step, sequences, split, metric, layer, head, [src_layer, src_head], value
      metrics.parquet    the same table, written at the end
      summary.json       final values, time_to_loss_0.5 and time_to_loss_0.277 (0.4·ln 2)
      checkpoints/       see optolab.model.checkpoint
      figures/           seaborn PNGs (see optolab.experiments.plots)

Rules:
- One writer at a time: a run holds ``.optolab.lock`` for its life (:mod:`optolab.core.lock`).
- ``--overwrite`` removes exactly the entries of :data:`OWNED` (and ``*.tmp`` leftovers of an
  interrupted write), and only from a folder that holds a run (``protocol.yaml`` or
  ``meta.json``) and nothing else: a file of the user's in it refuses the overwrite, and nothing
  is deleted (:meth:`RunDir.clear`).
- ``metrics.jsonl`` is append-only during a run; on resume, rows after the checkpoint's step are
  dropped (they will be recomputed identically). A finished run keeps its rows in
  ``metrics.parquet`` and the log gzipped (``metrics.jsonl.gz``, :meth:`RunDir.finish_log`), so a
  long run's files stay small (the quickstart's log: 7.1 MB as text).
- JSON and YAML summaries are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from optolab.core.errors import OptolabError
from optolab.core.files import read_json_object
from optolab.core.lock import LOCK_NAME

COLUMNS = ["step", "sequences", "split", "metric", "layer", "head", "src_layer", "src_head", "value"]


OWNED = ("protocol.yaml", "meta.json", "metrics.jsonl", "metrics.parquet", "summary.json", "checkpoints",
         "figures", "posthoc", "tensorboard", "wandb", "per_example", "metrics.jsonl.gz", "measures")  # what a run writes (plus the lock, which --overwrite keeps while it works)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # paths
    @property
    def protocol(self) -> Path:
        return self.path / "protocol.yaml"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_parquet(self) -> Path:
        return self.path / "metrics.parquet"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    # writing
    def clear(self) -> None:
        """Delete what a run wrote here (see the module rules); refuse, deleting nothing, when the
        folder is not a run or holds anything else. The caller holds the folder's lock."""
        for p in self.clearable():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def clearable(self) -> list[Path]:
        """What :meth:`clear` would delete; raises (one line) where it would refuse."""
        if not self.path.is_dir():
            raise OptolabError(f"'{self.path}' is not a folder.", field="--out", fix="choose a run directory.")
        entries = [p for p in self.path.iterdir() if p.name != LOCK_NAME]
        if entries and not (self.protocol.is_file() or self.meta.is_file()):
            raise OptolabError(f"refusing to overwrite '{self.path}': it is not an optolab run directory.",
                               field="--out", fix="choose another folder.")
        foreign = sorted(p.name for p in entries if p.name not in OWNED and not p.name.endswith(".tmp"))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OptolabError(f"refusing to overwrite '{self.path}': it holds files optolab did not write "
                               f"({shown}); --overwrite deletes only a run's own files.", field="--out",
                               fix="move those files out, or choose another --out.")
        return entries

    def write_protocol(self, resolved: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.protocol, yaml.safe_dump(resolved, sort_keys=False))

    def read_json(self, path: Path) -> dict:
        """A JSON file of the run ({} when absent); a damaged one is one clear error."""
        if not path.is_file():
            return {}
        return read_json_object(path, fix="pass --overwrite to redo the run (or restore the file).")

    def write_json(self, path: Path, data: dict) -> None:
        write_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        with self.metrics_jsonl.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only rows with ``step <= last_step`` (and drop a torn last line)."""
        if not self.metrics_jsonl.is_file():
            return
        kept = []
        for line in self.metrics_jsonl.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["step"] <= last_step:
                kept.append(line)
        write_atomic(self.metrics_jsonl, "".join(line + "\n" for line in kept))

    # reading
    def metrics(self) -> pd.DataFrame:
        """All metrics as a tidy DataFrame (from parquet if the run finished, else the jsonl)."""
        if self.metrics_parquet.is_file():
            return pd.read_parquet(self.metrics_parquet)
        return metrics_frame(self.metrics_jsonl)

    def finish_log(self) -> None:
        """Gzip the finished run's metrics log (its rows are in ``metrics.parquet``)."""
        import gzip

        if not self.metrics_jsonl.is_file():
            return
        tmp = self.path / "metrics.jsonl.gz.tmp"
        with self.metrics_jsonl.open("rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, self.path / "metrics.jsonl.gz")
        self.metrics_jsonl.unlink()

    def write_parquet(self) -> None:
        df = metrics_frame(self.metrics_jsonl)
        tmp = self.metrics_parquet.with_name("metrics.parquet.tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.metrics_parquet)


def metrics_frame(jsonl: Path) -> pd.DataFrame:
    rows = []
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("layer", "head", "src_layer", "src_head"):
        df[col] = df[col].astype("Int64")
    df["step"] = df["step"].astype("int64")
    df["sequences"] = df["sequences"].astype("int64")
    df["value"] = df["value"].astype("float64")
    return df


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def environment() -> dict[str, Any]:
    """Package versions, git commit and host: what a reader needs to reproduce a run."""
    versions = {}
    for pkg in ("optolab", "torch", "nnsight", "numpy", "pydantic", "safetensors", "pandas", "seaborn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    import torch

    return {
        "versions": {"python": platform.python_version(), **versions},
        "git_commit": _git_commit(),
        "host": {"machine": platform.machine(), "system": platform.system(),
                 "torch_threads": torch.get_num_threads()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")
