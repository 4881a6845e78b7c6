"""What a clamp writes: the value of every entry it selects, as a function of the activation.

Rules:
- A value function takes the site's activation ``out`` (as earlier clamps left it) and the
  step's :class:`PassContext`, and returns a tensor broadcastable to ``out``. The engine keeps it
  only on the selected entries (``torch.where``), so nothing is written in place and no
  gradient reaches ``out`` through a replaced entry.
- Values that stand for "another input" (mean, resample, graft, preserve) are detached unless
  the recipe needs their gradient (preserved and recorded activations keep theirs: gradients
  reach the clean pass, as in the authors' two-pass clamps).
- A call's step and random key reach the ops as tensors made outside every trace or compiled
  graph (:func:`call_inputs`), like the batch: an op that reads them (:meth:`PassContext.clock`,
  :meth:`PassContext.normal`) is one graph for every step, and equal on every path. So does,
  on the compiled path, which clamps act at the call (``PassContext.live``: windows as inputs,
  :mod:`optolab.clamps.engine`).
- Built-in patterns (ANCHORS §2), for a row ``i`` of ``[query_pos, key_pos]``:
  previous_token(s): ``P[i, i-1] = s, P[i, i] = 1 - s`` (i ≥ 1), ``P[0, 0] = 1``;
  perfect_match(s), query row only: ``s`` spread evenly over the label tokens that carry the
  query's label, ``1 - s`` over the other label tokens, 0 elsewhere (an oracle: it reads the
  batch's labels); uniform: ``1 / (i + 1)`` on keys ``0..i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from optolab.clamps.rng import normal
from optolab.tasks.base import Batch


@dataclass(frozen=True)
class Clock:
    """Where a call stands in a clamp's window, as tensors on the batch's device: ``step`` (the
    call's step; an evaluation at ``s`` sees the model after ``s`` updates), the window's
    ``start`` and ``stop`` (steps, ``[start, stop)``), and ``fraction`` elapsed,
    ``(step - start) / (stop - start)`` in [0, 1] (float32; 1 at the final evaluation of a window
    that runs to the end)."""

    step: Tensor
    start: Tensor
    stop: Tensor
    fraction: Tensor


@dataclass
class PassContext:
    """What a clamp op may read besides the activation (rules: :mod:`optolab.clamps.kind`)."""

    batch: Batch
    recorded: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (pass, site) -> activation
    prepared: dict[int, Tensor] = field(default_factory=dict)  # clamp index -> computed before the passes
    saved: dict[str, Tensor] = field(default_factory=dict)  # what the caller asked to save
    gate: Tensor | None = None  # in a union program: the member's condition, one-hot [condition]
    key: Tensor | None = None  # the call's random key (optolab.clamps.rng), [2] int64
    step: Tensor | None = None  # the call's step, an int64 scalar made outside every graph
    # which clamps act at this call, [condition, clamp index] bool, made outside every graph: the
    # gate of ops whose window is an input of the program (optolab.clamps.engine); None elsewhere
    live: Tensor | None = None
    draws: set[int] | None = None  # set by the planner's probe: the streams drawn from (optolab.clamps.plan)

    def normal(self, shape: tuple[int, ...], stream: int, device=None) -> Tensor:
        """Standard normal numbers for this call, ``stream`` (a clamp's index: ``c.index``) and
        ``shape``, on the key's device (the batch's) unless ``device`` says otherwise."""
        if self.key is None:
            raise RuntimeError("this forward call has no random key (a stochastic clamp needs one)")
        if self.draws is not None:
            self.draws.add(stream)
        return normal(self.key, stream, shape, self.key.device if device is None else device)

    def normal_like(self, x: Tensor, stream: int) -> Tensor:
        """Standard normal numbers of ``x``'s shape, dtype and device, for ``stream``."""
        return self.normal(tuple(x.shape), stream, x.device).to(x.dtype)

    def clock(self, c) -> Clock:
        """Where this call stands in clamp ``c``'s window (a :class:`~optolab.clamps.kind.Planned`;
        see :class:`Clock`). Tensors, so an op that reads them compiles once for every step."""
        if self.step is None:
            raise RuntimeError("this forward call has no step (a step-aware clamp needs one)")
        start, stop = c.when.start, c.when.stop
        step = self.step
        fraction = ((step - start).to(torch.float32) / (stop - start)).clamp(0.0, 1.0)
        return Clock(step, step.new_full((), start), step.new_full((), stop), fraction)


def call_inputs(key: Tensor, step: int, live: Tensor | None = None) -> dict[str, Tensor]:
    """A call's pass-context inputs made outside every graph: its random key and its step (on
    the key's device), and ``live`` (which clamps act) where the program is gated by it."""
    inputs = {"key": key, "step": torch.tensor(step, dtype=torch.int64, device=key.device)}
    if live is not None:
        inputs["live"] = live
    return inputs


def previous_token_pattern(n_q: int, n_k: int, strength: float) -> Tensor:
    p = torch.zeros(n_q, n_k)
    idx = torch.arange(1, n_q)
    p[idx, idx - 1] = strength
    p[idx, idx] = 1 - strength
    p[0, 0] = 1.0
    return p


def uniform_pattern(n_q: int, n_k: int) -> Tensor:
    p = torch.ones(n_q, n_k).tril()
    return p / p.sum(-1, keepdim=True)


def perfect_match_rows(batch: Batch, strength: float) -> Tensor:
    """``[batch, 1, 1, key_pos]``: the oracle query row (see the module rules)."""
    match = batch.match_mask.float()
    other = batch.nonmatch_mask.float()
    row = strength * match / match.sum(-1, keepdim=True).clamp_min(1) \
        + (1 - strength) * other / other.sum(-1, keepdim=True).clamp_min(1)
    return row[:, None, None, :]


def shift_right(e: Tensor) -> Tensor:
    """Each position takes the previous position's vector; the first and last keep their own
    (in ``x1 l1 x2 l2 q``, every label slot then holds the exemplar before it)."""
    shifted = e.clone()
    shifted[:, 1:-1] = e[:, :-2]
    return shifted
