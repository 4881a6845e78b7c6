"""Checkpoints: safetensors weights and optimizer state, plus a JSON sidecar.

Rules:
- ``checkpoints/step_00001234.safetensors`` (model), ``….optim.safetensors`` (Adam moments and
  step counts, keyed by parameter name) and ``….json`` (step, sequences, hyper-parameters).
- Every file is written to a temporary name and renamed; the sidecar is written last, so a
  checkpoint exists only when its sidecar does. A half-written checkpoint is never loaded.
- Only safetensors are read: nothing here unpickles.
- Files are device-free: tensors are saved from the CPU and loaded onto the device of the model
  they go into (Adam's step counts where torch's Adam keeps them: on the parameter's device for
  fused or capturable Adam, else on the CPU), so a run moves between devices at any checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from optolab.core.errors import OptolabError
from optolab.core.files import read_json_object


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def stem(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(folder: Path, step: int, sequences: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, info: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / stem(step)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(base.with_suffix(".safetensors"), lambda p: save_file(weights, str(p)))
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        state = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        state[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous()
        _atomic(folder / f"{stem(step)}.optim.safetensors", lambda p: save_file(state, str(p)))
    sidecar = {"step": step, "sequences": sequences, **(info or {})}
    _atomic(base.with_suffix(".json"), lambda p: p.write_text(json.dumps(sidecar, indent=2)))
    return base.with_suffix(".safetensors")


def list_checkpoints(folder: Path) -> list[int]:
    """Steps that have a complete checkpoint (sidecar present), ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for f in folder.glob("step_*.json"):
        try:
            steps.append(int(f.stem.split("_")[1]))
        except (IndexError, ValueError):
            continue
    return sorted(steps)


READ_FIX = "point at a step_*.safetensors written by optolab; pickled (.pt/.pth) checkpoints are never loaded."
RESUME_FIX = "delete that checkpoint's three files to resume from the one before, or pass --overwrite to redo the run."


def _read(path: Path, field: str, fix: str = READ_FIX) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one clear error (a torn, foreign or pickled file)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise OptolabError(f"'{path}' is not a readable safetensors file (damaged, or not a checkpoint: {e}).",
                           field=field, fix=fix) from None


def load_weights(path: Path, model: nn.Module, field: str = "--checkpoint", *,
                 mismatch_fix: str = "use the protocol that produced the checkpoint.",
                 damaged_fix: str = READ_FIX) -> None:
    """``path``'s weights into ``model``. Each refusal names the file: ``damaged_fix`` for one
    that cannot be read, ``mismatch_fix`` for one of another model."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise OptolabError(f"'{path.name}' is not a safetensors file.", field=field,
                           fix="point at a step_*.safetensors file; pickled checkpoints are refused.")
    if not path.is_file():
        raise OptolabError(f"checkpoint '{path}' not found.", field=field,
                           fix="list RUN_DIR/checkpoints/ and pick a step_*.safetensors file.")
    state = _read(path, field, damaged_fix)
    mine = model.state_dict()
    missing = set(mine) - set(state)
    unexpected = set(state) - set(mine)
    if missing or unexpected:
        raise OptolabError(
            f"checkpoint '{path}' does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}).", field=field, fix=mismatch_fix)
    for k, v in state.items():
        if v.shape != mine[k].shape:
            raise OptolabError(f"checkpoint '{path}' does not fit this model: its tensor '{k}' has shape "
                               f"{tuple(v.shape)}, the model expects {tuple(mine[k].shape)}.", field=field,
                               fix=mismatch_fix)
    model.load_state_dict(state)


def load_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore a run's own checkpoint (model and optimizer, in place) to resume it; return the sidecar."""
    base = folder / stem(step)
    load_weights(base.with_suffix(".safetensors"), model, "--out", mismatch_fix=RESUME_FIX, damaged_fix=RESUME_FIX)
    load_optimizer_state(base.with_suffix(".safetensors"), model, optimizer, "--out", damaged_fix=RESUME_FIX)
    return read_json_object(base.with_suffix(".json"), fix=RESUME_FIX)


def prune(folder: Path, keep: int | None, protect: set[int] = frozenset()) -> None:
    """Delete all but the newest ``keep`` checkpoints (never those in ``protect``)."""
    if keep is None:
        return
    for step in list_checkpoints(folder)[:-keep]:
        if step in protect:
            continue
        (folder / f"{stem(step)}.json").unlink(missing_ok=True)  # sidecar first: no half checkpoint
        for suffix in (".safetensors", ".optim.safetensors"):
            (folder / f"{stem(step)}{suffix}").unlink(missing_ok=True)


def find_checkpoint(source: str | Path, step: int | None, field: str,
                    step_field: str | None = None) -> tuple[Path, Path | None]:
    """``(weights file, run directory or None)`` for a checkpoint named by a run directory (its
    checkpoint at ``step``, by default the last) or a ``step_*.safetensors`` file; one clear error
    naming ``field`` (``step_field`` for a missing step) otherwise. Shared by graft and freeze
    clamps' ``source``, ``init_from`` and ``optolab evaluate --checkpoint``."""
    step_field = step_field or field
    p = Path(source).expanduser()
    try:
        where = p.resolve()
    except (RuntimeError, OSError):  # RuntimeError: a symbolic link loop, as Python 3.11 reports one
        raise OptolabError(f"'{source}' cannot be followed: a symbolic link on the way loops.", field=field,
                           fix="give the run directory or the checkpoint file itself (or repair the link).") from None
    if p.is_dir():
        steps = list_checkpoints(p / "checkpoints")
        if not steps:
            raise OptolabError(f"'{source}' holds no checkpoints.", field=field,
                               fix="point at a run directory written by `optolab run`, or at a step_*.safetensors file.")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise OptolabError(f"'{source}' has no checkpoint at step {step}.", field=step_field,
                               fix=f"use one of its steps: {steps[:8]}{' …' if len(steps) > 8 else ''}.")
        return p / "checkpoints" / f"{stem(step)}.safetensors", p
    if not p.is_file():
        raise OptolabError(f"'{source}' does not exist (looked for {where}).", field=field,
                           fix="give a run directory or a checkpoint .safetensors file; relative paths start at the "
                               "protocol's folder.")
    if p.suffix != ".safetensors" or p.name.endswith(".optim.safetensors"):
        raise OptolabError(f"'{p.name}' is not a model checkpoint.", field=field,
                           fix="use a step_*.safetensors file (pickled checkpoints are refused).")
    if step is not None:
        raise OptolabError("'step' only applies when the checkpoint is named by a run directory.", field=step_field,
                           fix="remove 'step'.")
    run_dir = p.parent.parent
    return p, run_dir if (run_dir / "protocol.yaml").is_file() else None


def load_optimizer_state(weights: Path, model: nn.Module, optimizer: torch.optim.Optimizer, field: str, *,
                         damaged_fix: str = READ_FIX) -> None:
    """The Adam state saved beside ``weights`` into ``optimizer`` (as :func:`load_checkpoint`);
    a file that does not fit the model is refused naming it, before anything is loaded."""
    path = weights.with_name(weights.name.replace(".safetensors", ".optim.safetensors"))
    if not path.is_file():
        raise OptolabError(f"'{path.name}' is missing: the checkpoint has no optimizer state.", field=field,
                           fix="set optimizer: false, or point at a checkpoint written by `optolab run`.")
    state = _read(path, field, damaged_fix)
    params = dict(model.named_parameters())
    entries = []
    for key, value in state.items():
        name, _, entry = key.partition("::")
        p = params.get(name)
        if p is None or (entry in ("exp_avg", "exp_avg_sq") and value.shape != p.shape):
            raise OptolabError(f"'{path}' does not fit this model (its entry '{key}' has shape "
                               f"{tuple(value.shape)}).", field=field, fix=damaged_fix)
        entries.append((p, entry, value))
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for p, entry, value in entries:
        device = p.device if entry != "step" or on_device else torch.device("cpu")
        optimizer.state[p][entry] = value.to(device, copy=True)
