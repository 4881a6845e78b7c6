"""Each planned clamp in plain words, for ``optolab validate``.

Rules:
- A sentence is ``Clamp <i> (<name>), <when>: <what>``; the *what* comes from the clamp's kind
  (:meth:`~optolab.clamps.kind.ClampSpec.describe`), written with the helpers of :class:`Words`
  so every kind names sites, heads and positions the same way.
- Clamps on parameters act on updates: their *when* names no phase.
- A clamp whose ops draw random numbers (the planner's probe, or the kind's declaration) says
  so, and that it is never shared across an ensemble's conditions: a plug-in author can see the
  probe's verdict.
"""

from __future__ import annotations

from optolab.clamps.kind import Planned
from optolab.clamps.plan import Plan


class Words:
    """How a clamp's where and who read, for a model with ``n_heads`` heads per layer."""

    def __init__(self, n_heads: int) -> None:
        self.n_heads = n_heads

    def heads(self, heads: tuple[int, ...] | None) -> str:
        if heads is None:
            return f"all {self.n_heads} heads"
        return ("head " if len(heads) == 1 else "heads ") + ", ".join(map(str, heads))

    def where(self, c: Planned) -> str:
        site = c.site
        text = f"'{site.name}'"
        if site.head_axis is not None:
            text += f" ({self.heads(c.heads)})"
        if c.positions != "all":
            rows = "query rows" if site.is_pattern or site.is_scores else "positions"
            text += f" at {rows} {c.positions if isinstance(c.positions, str) else list(c.positions)}"
        return text

    def pattern_subject(self, c: Planned) -> str:
        layer = c.site.layer
        if c.heads is not None and len(c.heads) == 1:
            return f"head {c.heads[0]} of layer {layer}"
        return f"{self.heads(c.heads)} of layer {layer}"


def _when(c: Planned, plan: Plan, phase: bool = True) -> str:
    w, bs = c.when, plan.batch_size
    span = f"from step {w.start:,} to {w.stop:,} ({w.start * bs:,}–{w.stop * bs:,} sequences" + (
        ", the whole run)" if w.start == 0 and w.stop == plan.total_steps else ")")
    if not phase:
        return span
    words = {(True, True): "in training and evaluation", (True, False): "in training only",
             (False, True): "in evaluation only"}[(w.train, w.eval)]
    return f"{span}, {words}"


def describe_clamp(c: Planned, plan: Plan, n_heads: int) -> str:
    s = c.spec
    label = f"Clamp {c.index}" + (f" ({s.name})" if s.name else "")
    when = _when(c, plan, phase=s.acts_on_forward)
    draws = " It draws random numbers: never shared across an ensemble's conditions." if c.draws else ""
    return f"{label}, {when}: {s.describe(c, Words(n_heads))}{draws}"
