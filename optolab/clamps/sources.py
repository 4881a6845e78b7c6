"""Files a clamp reads: graft models, freeze values and tensors for ``set: file``.

Rules:
- A ``source`` is a run directory (its last checkpoint, or ``step``) or a checkpoint
  ``.safetensors`` file. Only safetensors are read: nothing is unpickled.
- A graft model is rebuilt with the model config its own run recorded in ``meta.json`` when
  there is one (so a model of another shape can be grafted if the site's activation fits), else
  with this protocol's model config. It must take the same inputs and produce the site with the same shape.
- Paths are resolved by the loader against the protocol file's folder before they get here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from optolab.clamps.sites import canonical
from optolab.core.errors import OptolabError
from optolab.model.checkpoint import find_checkpoint, load_weights
from optolab.model.config import ModelConfig
from optolab.model.hooks import dry_run
from optolab.model.transformer import Transformer


def _err(i: int, field: str, message: str, fix: str) -> OptolabError:
    return OptolabError(message, field=f"clamps.{i}.{field}", fix=fix)


def _path(p: str) -> Path:
    return Path(p).expanduser()


def checkpoint_file(i: int, source: str, step: int | None) -> tuple[Path, Path | None]:
    """``(weights file, run directory or None)`` for a clamp's ``source``."""
    return find_checkpoint(source, step, f"clamps.{i}.source", f"clamps.{i}.step")


def load_frozen_model(i: int, spec, cfg, batch, shapes: dict) -> Transformer:
    weights, run_dir = checkpoint_file(i, spec.source, spec.step)
    other_cfg = cfg
    recorded = _recorded_config(run_dir) if run_dir is not None else None
    if recorded is not None:
        other_cfg = recorded
    for key in ("input_mode", "d_input", "n_labels", "d_vocab"):
        if getattr(other_cfg, key) != getattr(cfg, key):
            raise _err(i, "source", f"the graft model takes different inputs ({key} {getattr(other_cfg, key)} "
                       f"vs {getattr(cfg, key)} here).", "graft from a run of the same task.")
    model = Transformer(other_cfg)
    try:
        load_weights(weights, model)
    except OptolabError as e:
        raise _err(i, "source", e.message, "graft from a checkpoint of the run that wrote it.") from None
    site = canonical(spec.site)
    theirs = dry_run(model, batch)
    if theirs.get(site) != shapes[site]:
        raise _err(i, "site", f"the graft model's '{site}' has shape {theirs.get(site)}, this model's is "
                   f"{shapes[site]}.", "graft a site whose activation has the same shape in both models.")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _recorded_config(run_dir: Path) -> ModelConfig | None:
    """The model config a run recorded in its ``meta.json`` (every run writes it when it starts)."""
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
        return ModelConfig(**meta["model_config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_param_values(i: int, spec, model: Transformer) -> dict[str, Tensor]:
    weights, _ = checkpoint_file(i, spec.source, spec.step)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise _err(i, "source", f"cannot read '{weights}': {e}.", "point at an intact checkpoint.") from None
    mine = dict(model.named_parameters())[spec.param]
    theirs = state.get(spec.param)
    if theirs is None or theirs.shape != mine.shape:
        got = "missing" if theirs is None else f"shape {tuple(theirs.shape)}"
        raise _err(i, "source", f"the checkpoint's '{spec.param}' is {got}; this model needs {tuple(mine.shape)}.",
                   "use a checkpoint of a model with the same shape.")
    return {spec.param: theirs.clone()}


def load_tensor_file(i: int, file: str, site_shape: tuple[int, ...]) -> Tensor:
    p = _path(file)
    if p.suffix != ".safetensors" or not p.is_file():
        raise _err(i, "file", f"'{file}' is not an existing .safetensors file.",
                   "save the tensor with safetensors.torch.save_file({'value': t}, 'x.safetensors').")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise _err(i, "file", f"cannot read '{file}': {e}.", "write it with safetensors.torch.save_file.") from None
    if len(state) != 1:
        raise _err(i, "file", f"'{file}' holds {len(state)} tensors; exactly one is needed.",
                   "save a single tensor (any key).")
    raw = next(iter(state.values()))
    if not (raw.is_floating_point() or raw.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise _err(i, "file", f"the tensor's dtype is {raw.dtype}; a clamp value is a real number.",
                   "save a float tensor (float32, float16, bfloat16 or float64).")
    t = raw.float()
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise _err(i, "file", f"the tensor holds {bad} NaN or infinite value(s) (in float32); the model would "
                   "diverge at the first step.", "save finite values.")
    try:
        torch.broadcast_shapes(t.shape, site_shape)
    except RuntimeError:
        raise _err(i, "file", f"the tensor has shape {tuple(t.shape)}, which does not broadcast to the site's "
                   f"shape [batch, {', '.join(map(str, site_shape[1:]))}].",
                   "store a tensor shaped like the site without the batch axis (or broadcastable to it).") from None
    return t
