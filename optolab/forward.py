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
  (:class:`optolab.clamps.engine.ClampForward`) runs nnsight traces.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from optolab.tasks.base import Batch


class Forward:
    def __call__(self, model: nn.Module, batch: Batch, *, step: int, training: bool,
                 save: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after ``loss.backward()``, before clipping and the optimizer step."""

    def after_update(self, model: nn.Module, step: int) -> None:
        """Called after ``optimizer.step()``."""


class PlainForward(Forward):
    """No interventions. Saved activations are taken with PyTorch forward hooks."""

    def __call__(self, model: nn.Module, batch: Batch, *, step: int = 0, training: bool = False,
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


def make_forward(protocol, task, cfg) -> Forward:
    """The Forward a protocol needs: plain without clamps, else the clamp engine with the
    protocol's compiled plan; with ``train.compile`` every call goes through
    :class:`optolab.compiled.CompiledForward`."""
    forward: Forward = PlainForward()
    if protocol.clamps:
        from optolab.clamps.compile import compile_clamps
        from optolab.clamps.engine import ClampForward

        forward = ClampForward(compile_clamps(protocol, task, cfg), backend=protocol.train.clamp_engine)
    if protocol.train.compile:
        from optolab.compiled import CompiledForward, require_compiler

        require_compiler()
        forward = CompiledForward(forward)
    return forward
