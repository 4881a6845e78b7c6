"""How a batch goes through the model: the one seam between the trainer and interventions.

Rules:
- The trainer and the evaluator call a ``Forward`` and nothing else; they know no clamp kinds.
- ``forward(model, batch, step=…, training=…, save=[hook names])`` returns ``(logits, saved)``
  where ``saved`` maps each requested hook name to the activation *as the model used it* (after
  any intervention). ``step`` is the optimizer step about to be taken (training) or the number
  of updates the evaluated model has had. The loss is computed by the caller, outside any trace.
- Around the update the trainer calls ``after_backward(model, step)`` (before gradient
  clipping and ``optimizer.step()``) and ``after_update(model, step)``; a Forward may use them
  to keep parameters fixed.
- :class:`PlainForward` runs the model untouched. The clamp engine
  (:class:`optolab.clamps.engine.ClampForward`) runs nnsight traces; which Forward a protocol
  gets is decided by :func:`optolab.training.trainer.make_forward`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from optolab.model.hooks import SiteHooks
from optolab.tasks.base import Batch


class Forward:
    def __call__(self, model: nn.Module, batch: Batch, *, step: int, training: bool,
                 save: Sequence[str] = (), seeds: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``seeds`` (init, data) stand in for the run's own where random numbers are keyed by
        them (an ensemble member evaluated through its condition's Forward)."""
        raise NotImplementedError

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after ``loss.backward()``, before clipping and the optimizer step."""

    def after_update(self, model: nn.Module, step: int) -> None:
        """Called after ``optimizer.step()``."""

    def close(self) -> None:
        """Remove whatever the Forward attached to models (site hooks); it may not be called again."""


class PlainForward(Forward):
    """No interventions. Saved activations are taken with site hooks, removed after the call."""

    def __call__(self, model: nn.Module, batch: Batch, *, step: int = 0, training: bool = False,
                 save: Sequence[str] = (), seeds: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if not save:
            return model(*batch.inputs), {}
        saved: dict[str, Tensor] = {}

        def grab(name: str):
            def op(out: Tensor, _ctx) -> Tensor:
                saved[name] = out.detach()
                return out
            return op

        hooks = SiteHooks(model)
        try:
            hooks.cover(save)
            with hooks.acting({name: [grab(name)] for name in save}, None):
                logits = model(*batch.inputs)
        finally:
            hooks.close()
        return logits, saved
