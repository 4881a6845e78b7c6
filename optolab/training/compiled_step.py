"""The training step of a ``train.compile`` run: forward (every pass of the clamp program), loss
and backward as one compiled graph, then torch's Adam.

Rules:
- Same step as the trainer's eager one: the clamp program comes from the same engine
  (``prepare``), the loss is the trainer's cross-entropy, and the gradient is
  ``torch.func.grad_and_value`` of it with respect to the parameters, which is the gradient
  ``loss.backward()`` computes (up to float rounding: the compiler reorders sums; the tolerance
  is stated and tested in ``tests/test_compiled.py``).
- The update is torch's own. Plain fused Adam (the default: ``train.fused``, no ``freeze``
  clamp, no ``train.grad_clip``) calls the optimizer's fused kernel directly on the optimizer's
  state tensors (:func:`adam_`), skipping ~0.25 ms of ``Optimizer.step`` bookkeeping per step;
  anything else sets ``.grad`` and runs the trainer's sequence (``after_backward``, clipping,
  ``optimizer.step()``, ``after_update``). Either way the optimizer's state is the one
  checkpoints save and resumption loads.
- A parameter the step's loss does not depend on at all (below a layer clamp) gets no update,
  as torch's optimizers skip a parameter without a gradient; ``grad_and_value`` would give it
  zeros, which Adam's momentum and weight decay would act on (found once per set of clamps
  acting, on their own program, windows as constants:
  :func:`~optolab.training.compiled.unused_parameters`,
  :meth:`~optolab.training.compiled.CompiledForward.own_program`).
- A non-finite loss leaves parameters and optimizer state untouched (as the eager path); the
  caller then stops the run.
- The step's graph is compiled with :data:`~optolab.training.compiled.STEP_OPTIONS` (a C++ wrapper),
  and torch's per-call guard check is skipped where it cannot change the answer
  (:class:`~optolab.training.compiled.CallKeys`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from optolab.clamps.engine import Program
from optolab.protocol.schema import Protocol
from optolab.tasks import IGNORE
from optolab.tasks.base import Batch
from optolab.training.compiled import (
    CallKeys,
    CompiledForward,
    compile_fn,
    step_options,
    unused_parameters,
)


def plain_adam(protocol: Protocol) -> bool:
    """The update is fused Adam on every parameter, nothing between backward and step."""
    t = protocol.train
    return t.fused and t.grad_clip is None and all(c.acts_on_forward for c in protocol.clamps)


def ensure_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's state as ``torch.optim.Adam(fused=True)`` does at its first step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


@torch.no_grad()
def adam_(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor]) -> None:
    """What ``optimizer.step()`` does for fused Adam with these gradients (one parameter group),
    without its per-call bookkeeping: the same kernel on the same state."""
    group = optimizer.param_groups[0]
    states = [optimizer.state[p] for p in params]
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adam_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                       steps, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                       eps=group["eps"], amsgrad=False, maximize=False)


class CompiledStep:
    """One training step of a solo ``train.compile`` run: ``step(batch, step) -> loss``."""

    def __init__(self, protocol: Protocol, forward: CompiledForward, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
        self.protocol, self.forward, self.optimizer = protocol, forward, optimizer
        self.dispatch = forward.dispatch(model)
        self.plain = plain_adam(protocol)
        self.params = list(model.parameters())
        self.names = [n for n, _ in model.named_parameters()]
        # parameters only ever change in place (Adam, a freeze's restore): one detached view each
        self.detached = {n: p.detach() for n, p in zip(self.names, self.params)}
        self.compiled = compile_fn(self._grads, step_options(self.params[0].device))
        self.keys = CallKeys()
        self._used_by: dict[int, list[int]] = {}
        if self.plain:
            ensure_state(optimizer)

    def _loss(self, params: dict[str, Tensor], program: Program, batch: Batch, inputs: dict) -> Tensor:
        model = self.dispatch.model
        logits, _ = self.dispatch.run(program, batch, inputs, lambda *inputs: functional_call(model, params, inputs))
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)

    def _grads(self, params: dict[str, Tensor], program: Program, batch: Batch, inputs: dict):
        grads, loss = grad_and_value(self._loss)(params, program, batch, inputs)
        return [grads[n] for n in self.names], loss

    def _used(self, program: Program, batch: Batch, inputs: dict) -> list[int]:
        """Indices of the parameters ``program``'s loss depends on (see :func:`unused_parameters`)."""
        used = self._used_by.get(id(program))  # programs live as long as their engine: ids stay unique
        if used is None:
            self.dispatch.cover(program)
            unused = unused_parameters(lambda p: self._loss(p, program, batch, inputs), self.detached)
            used = self._used_by[id(program)] = [i for i, n in enumerate(self.names) if n not in unused]
        return used

    def __call__(self, batch: Batch, step: int) -> Tensor:
        model = self.dispatch.model
        program, inputs = self.forward.program(model, batch, step, True)
        self.dispatch.warm(program, tuple(t.shape for t in batch.inputs),
                           lambda: self.dispatch.run(program, batch, inputs))
        used = self._used(self.forward.own_program(step, True), batch, inputs)
        with self.keys.guards(program, batch, inputs):
            grads, loss = self.compiled(self.detached, program, batch, inputs)
        if not math.isfinite(loss.item()):
            return loss
        if self.plain:
            if len(used) == len(self.params):
                adam_(self.optimizer, self.params, grads)
            else:
                adam_(self.optimizer, [self.params[i] for i in used], [grads[i] for i in used])
            return loss
        grads = [g if i in used else None for i, g in enumerate(grads)]
        for p, g in zip(self.params, grads):
            p.grad = g
        self.forward.after_backward(model, step)
        if self.protocol.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.protocol.train.grad_clip)
        self.optimizer.step()
        self.forward.after_update(model, step)
        return loss
