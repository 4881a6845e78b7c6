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
- ``--overwrite`` removes only files optolab wrote: those whose path in the run directory
  matches :data:`OWNED` (names optolab gives: ``checkpoints/step_*``, ``figures/loss.png``,
  ``tensorboard/events.out.tfevents.*``, everything inside wandb's own run folder
  ``wandb/offline-run-…-optolab-<id>/``, and a ``.tmp`` leftover of any of them), and those
  recorded in ``.optolab.files`` when written (:func:`record`: files whose names the user
  chooses, as ``optolab evaluate``'s CSVs). A run started by this version also lists every
  checkpoint file it writes there (the record's first line, :data:`LISTED`, says so): in such a
  run a file in ``checkpoints/`` is the run's only when listed, so a checkpoint copied in under
  a step name (``step_00000099.safetensors``) is not deleted. Anything else anywhere in the
  folder — a file, a folder, a symbolic link, in ``checkpoints/``, ``figures/`` or any
  subfolder — refuses the overwrite naming it, and nothing is deleted
  (:meth:`RunDir.clearable`). A folder that holds no run (no ``protocol.yaml`` or
  ``meta.json``) is refused likewise. Files are then deleted one by one and emptied folders
  removed: a file that appears meanwhile is kept.
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
import re
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from optolab.core.errors import OptolabError
from optolab.core.files import read_json_object, read_jsonl_rows
from optolab.core.lock import LOCK_NAME

COLUMNS = ["step", "sequences", "split", "metric", "layer", "head", "src_layer", "src_head", "value"]


# What a run writes (see the module rules), as paths relative to the run directory; each may
# also be left as NAME.tmp by an interrupted atomic write. Runs written before the record
# existed are recognised by these alone.
OWNED = (
    r"protocol\.yaml", r"meta\.json", r"metrics\.jsonl(\.gz)?", r"metrics\.parquet", r"summary\.json",
    r"\.optolab\.files",
    r"checkpoints/step_\d+(\.optim)?\.safetensors", r"checkpoints/step_\d+\.json",
    r"figures/(loss|head_scores|prev_token|attention|loss_by_position|trajectory|llc|stages)\.png",
    r"per_example/index\.jsonl", r"per_example/[\w.+-]+\.f16",
    r"measures/llc/estimates\.jsonl", r"measures/llc/traces_\d+\.npz",
    r"measures/llc/posthoc_[0-9a-f]+/(config\.json|estimates\.jsonl|traces_\d+\.npz|llc\.png)",
    r"measures/llc/calibration_\d+/(calibration\.csv|traces\.png)",
    r"tensorboard/events\.out\.tfevents\.[^/]+",
    r"wandb/debug(-internal)?\.log", r"wandb/latest-run",  # wandb's link to its newest run folder
    r"wandb/(offline-)?run-\d{8}_\d{6}-optolab-[0-9a-f]{16}(/.+)?",  # wandb's own folder of this run's W&B run
)
_OWNED = re.compile("(" + "|".join(OWNED) + r")(\.tmp)?")
_OWNED_FOLDERS = re.compile(r"checkpoints|figures|per_example|tensorboard|wandb|measures|measures/llc"
                            r"|measures/llc/(posthoc_[0-9a-f]+|calibration_\d+)"
                            r"|wandb/(offline-)?run-\d{8}_\d{6}-optolab-[0-9a-f]{16}(/.+)?")
DAMAGED_LOG_FIX = ("delete that line (rows after the last checkpoint are recomputed on resume), or pass "
                   "--overwrite to redo the run.")
RECORD = ".optolab.files"  # paths of files optolab wrote under names it does not choose (one a line)
LISTED = "# and every checkpoint file this run wrote"  # the record's first line in runs that list them
CHECKPOINT_SUFFIXES = (".safetensors", ".optim.safetensors", ".json")  # optolab.model.checkpoint's three


def record(run_dir: str | Path, path: str | Path) -> None:
    """Note that optolab wrote ``path`` (inside ``run_dir``), so ``--overwrite`` may delete it."""
    rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(run_dir)).as_posix()
    if rel in _recorded(Path(run_dir)):
        return
    with (Path(run_dir) / RECORD).open("a") as f:
        f.write(rel + "\n")


def _listing(run_dir: Path) -> bool:
    """Whether this run lists its checkpoint files in the record (see the module rules)."""
    try:
        with (run_dir / RECORD).open() as f:
            return f.readline().rstrip("\n") == LISTED
    except (OSError, UnicodeDecodeError):
        return False


def _recorded(run_dir: Path) -> set[str]:
    try:
        return set((run_dir / RECORD).read_text().splitlines())
    except (OSError, UnicodeDecodeError):
        return set()


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
        files, folders = self.clearable()
        files.sort(key=lambda p: p.name == RECORD)  # the record last: an interrupted clear leaves no orphan
        for p in files:
            p.unlink(missing_ok=True)
        for d in sorted(folders, key=lambda q: len(q.parts), reverse=True):  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: something appeared since the check, and it stays

    def clearable(self) -> tuple[list[Path], list[Path]]:
        """``(files, folders)`` :meth:`clear` would delete; raises (one line) where it would refuse."""
        if not self.path.is_dir():
            raise OptolabError(f"'{self.path}' is not a folder.", field="--out", fix="choose a run directory.")
        files, folders, foreign = _walk(self.path, _recorded(self.path), _listing(self.path))
        if (files or folders or foreign) and not (self.protocol.is_file() or self.meta.is_file()):
            raise OptolabError(f"refusing to overwrite '{self.path}': it is not an optolab run directory.",
                               field="--out", fix="choose another folder.")
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OptolabError(f"refusing to overwrite '{self.path}': it holds files optolab did not write "
                               f"({shown}); --overwrite deletes only a run's own files.", field="--out",
                               fix="move those files out, or choose another --out.")
        return files, folders

    def begin_listing(self) -> None:
        """A run starting from step 0 with no checkpoint yet lists its checkpoint files from now
        on (the record's first line says so; a record already there keeps its lines)."""
        if _listing(self.path) or any(self.checkpoints.glob("step_*")):
            return
        kept = sorted(_recorded(self.path))
        write_atomic(self.path / RECORD, "\n".join([LISTED, *kept]) + "\n")

    def list_checkpoint(self, stem: str) -> None:
        """Record the files of checkpoint ``stem`` (``step_00001234``) before they are written."""
        for suffix in CHECKPOINT_SUFFIXES:
            record(self.path, self.checkpoints / f"{stem}{suffix}")

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
        kept = [row for row in self.metric_rows() if row["step"] <= last_step]
        write_atomic(self.metrics_jsonl, "".join(json.dumps(row) + "\n" for row in kept))

    def metric_rows(self) -> list[dict]:
        """The rows of ``metrics.jsonl``; a damaged line is one error naming it."""
        return read_jsonl_rows(self.metrics_jsonl, fix=DAMAGED_LOG_FIX)

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


def _walk(root: Path, recorded: set[str], listing: bool = False) -> tuple[list[Path], list[Path], list[str]]:
    """Every entry under ``root`` but the lock: ``(owned files, owned folders, foreign paths)``.
    A folder is owned when a run makes it (or a recorded file is in it) and all it holds is
    owned; links are never followed (and are foreign, but for wandb's own). With ``listing``,
    a checkpoint file is owned only when recorded (or the ``.tmp`` of one that is)."""
    parents = {Path(r).parent.as_posix() for r in recorded}
    folders_of_record = {q for r in parents for q in _ancestors(r)}
    files: list[Path] = []
    folders: list[Path] = []
    foreign: list[str] = []

    def visit(folder: Path) -> bool:  # whether everything in ``folder`` is the run's
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            raise OptolabError(f"cannot read '{folder}': {e.strerror}.", field="--out",
                               fix="make it readable, or choose another --out.") from None
        clean = True
        for p in entries:
            rel = p.relative_to(root).as_posix()
            if rel == LOCK_NAME:
                continue
            ours = rel in recorded or _OWNED.fullmatch(rel) is not None
            if ours and listing and rel.startswith("checkpoints/"):
                ours = rel.removesuffix(".tmp") in recorded
            if p.is_dir() and not p.is_symlink():
                if not (_OWNED_FOLDERS.fullmatch(rel) or rel in folders_of_record):
                    foreign.append(rel + "/")
                    clean = False
                elif visit(p):
                    folders.append(p)
                else:
                    clean = False
            elif ours and (not p.is_symlink() or rel == "wandb/latest-run"):
                files.append(p)
            else:
                foreign.append(rel)
                clean = False
        return clean

    visit(root)
    return files, folders, foreign


def _ancestors(rel: str) -> list[str]:
    parts = [] if rel in ("", ".") else rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def metrics_frame(jsonl: Path) -> pd.DataFrame:
    rows = read_jsonl_rows(jsonl, fix=DAMAGED_LOG_FIX)
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
