"""Mixing the training batches of several tasks row by row (a protocol's ``data`` mixtures).

Rules:
- Batches mix when they carry the same structure (:func:`layout`): the same :class:`Batch` fields
  present (a field is ``None`` in all of them or a tensor in all), as many inputs, and every
  tensor with the same per-row shape and dtype. A field whose leading size is 1 (shared by all
  rows, as ``induction_targets`` may be) counts as per-row. :func:`why_not_mixable` says in words
  what differs.
- :func:`mix_rows` takes row i of the mixture from ``batches[which[i]]``. Every batch passed has
  the mixture's full size, so row i of a mixture is exactly row i of its task's own batch.
- ``extra`` keeps the tensor entries that every batch carries with the same per-row shape, mixed
  the same way; other entries are dropped (one task's provenance is not the mixture's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from optolab.tasks.base import Batch

FIELDS = ("targets", "match_mask", "nonmatch_mask", "context_labels", "tokens", "induction_targets")


def layout(batch: Batch) -> dict[str, tuple | None]:
    """Per field, ``(per-row shape, dtype)`` or None where the batch does not carry it."""
    out: dict[str, tuple | None] = {f"inputs.{i}": (tuple(x.shape[1:]), x.dtype) for i, x in enumerate(batch.inputs)}
    for name in FIELDS:
        v = getattr(batch, name)
        out[name] = None if v is None else (tuple(v.shape[1:]), v.dtype)
    return out


def why_not_mixable(batches: dict[str, Batch]) -> str | None:
    """None when the named batches can be mixed row-wise, else what differs, in words."""
    (first, a), *rest = batches.items()
    la = layout(a)
    for name, b in rest:
        lb = layout(b)
        for f in sorted(set(la) | set(lb)):
            x, y = la.get(f), lb.get(f)
            if x == y:
                continue
            if x is None or y is None:
                has, lacks = (first, name) if y is None else (name, first)
                return f"'{has}''s batches carry {f} and '{lacks}''s do not"
            return (f"their {f} differ: per row {list(x[0])} {str(x[1]).removeprefix('torch.')} in '{first}', "
                    f"{list(y[0])} {str(y[1]).removeprefix('torch.')} in '{name}'")
    return None


def _rows(t: Tensor, n: int) -> Tensor:
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 and n != 1 else t


def _pick(tensors: list[Tensor], which: Tensor) -> Tensor:
    n = which.shape[0]
    if len(tensors) == 1:
        return _rows(tensors[0], n)
    stacked = torch.stack([_rows(t, n) for t in tensors])
    return stacked[which, torch.arange(n)]


def mix_rows(batches: list[Batch], which: Tensor) -> Batch:
    """Row i from ``batches[which[i]]`` (each batch has ``len(which)`` rows; see the module rules).
    The caller has checked :func:`why_not_mixable`."""
    n = which.shape[0]
    kwargs = {}
    for name in FIELDS:
        values = [getattr(b, name) for b in batches]
        kwargs[name] = None if values[0] is None else _pick(values, which)
    inputs = tuple(_pick([b.inputs[i] for b in batches], which) for i in range(len(batches[0].inputs)))
    extra = {}
    for key, v in batches[0].extra.items():
        values = [b.extra.get(key) for b in batches]
        if all(isinstance(x, Tensor) and x.dim() and x.shape[0] == n and x.shape == v.shape and x.dtype == v.dtype
               for x in values):
            extra[key] = _pick(values, which)
    return Batch(inputs=inputs, extra=extra, **kwargs)
