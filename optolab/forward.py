"""How a batch goes through the model: the one seam between the trainer and interventions.

Rules:
- The trainer and the evaluator call a ``Forward`` and nothing else; they know no clamp kinds.
- ``forward(model, batch, training=…, save=[hook names])`` returns ``(logits, saved)`` where
  ``saved`` maps each requested hook name to the activation *as the model used it* (after any
  intervention). The loss is computed by the caller, outside any trace.
- :class:`PlainForward` runs the model untouched. The clamp engine supplies another ``Forward``
  that runs one nnsight trace per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor, nn

from optolab.tasks.base import Batch


class Forward(Protocol):
    def __call__(self, model: nn.Module, batch: Batch, *, training: bool,
                 save: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]: ...


class PlainForward:
    """No interventions. Saved activations are taken with PyTorch forward hooks."""

    def __call__(self, model: nn.Module, batch: Batch, *, training: bool,
                 save: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        if not save:
            return model(*batch.inputs), {}
        saved: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        handles = []
        for name in save:
            def grab(_m, _inp, out, name=name):
                saved[name] = out.detach()
            handles.append(modules[name].register_forward_hook(grab))
        try:
            logits = model(*batch.inputs)
        finally:
            for h in handles:
                h.remove()
        return logits, saved
