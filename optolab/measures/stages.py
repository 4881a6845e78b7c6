"""Developmental stages from several signals: the loss, head scores and the per-example loss
trajectory, not the loss drop alone (Hoogland et al. 2024: previous-token heads form while the
loss is nearly flat, then the circuit completes as it drops).

Method:
1. Each signal is a curve over training (sequences) with the direction its structure moves in:
   the main loss (down), each watched head score (up: the strongest layer-0 ``prev_token`` and
   last-layer induction-type score of the run), the trajectory's speed (up: a burst of
   movement) and, where the run estimates it (``measures.llc``), the local learning coefficient
   at checkpoints, once each way (``llc rises``, ``llc falls``: Hoogland et al.'s boundaries
   turn it up and down). Every abrupt *event* :func:`optolab.measures.phase.detect` finds in a curve
   (after a plateau or not: a stage boundary need not be a phase change; a slow creep is not a
   boundary) contributes two candidate boundaries, its onset and its end, named by the signal.
2. Candidates within ``merge`` eval spacings of each other (default 2; the spacing is the main
   loss's median eval interval) are one boundary, at their median, listing every signal that
   marks it.
3. Stages are the spans between consecutive boundaries (and the run's start and end). A stage's
   kind comes from the main loss over it: ``loss falls`` where it drops by more than
   ``flat`` (default 10 %) of the run's total drop; otherwise ``loss flat``, and ``loss flat
   while structure forms`` where a score rises by more than ``flat`` of its range over the
   stage (the stage Hoogland et al. find first). Each stage lists the signals that rose or fell.
4. Nothing is guessed: a run whose signals show no event is one stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from optolab.measures.phase import detect


@dataclass(frozen=True)
class Signal:
    xs: np.ndarray
    ys: np.ndarray
    direction: str  # "down" or "up": where its structure moves


def boundaries(signals: Mapping[str, Signal], spacing: float, merge: float = 2.0) -> list[dict]:
    """Candidate boundaries merged (see the module method): ``[{"at", "signals"}]`` in order;
    ``spacing`` is the eval interval ``merge`` counts in."""
    found = []
    lo = min(float(np.nanmin(s.xs)) for s in signals.values())
    hi = max(float(np.nanmax(s.xs)) for s in signals.values())
    for name, s in signals.items():
        for e in detect(s.xs, s.ys, direction=s.direction, require_plateau=False).events:
            if e.abrupt:
                found += [(float(e.onset), f"{name} onset"), (float(e.end), f"{name} end")]
    found.sort()
    out: list[list[tuple[float, str]]] = []
    for x, name in found:
        if out and x - out[-1][-1][0] <= merge * spacing:
            out[-1].append((x, name))
        else:
            out.append([(x, name)])
    return [{"at": float(np.median([x for x, _ in group])), "signals": [n for _, n in group]} for group in out
            if lo < float(np.median([x for x, _ in group])) < hi]


def _change(s: Signal, a: float, b: float) -> float:
    """The signal's move from ``a`` to ``b`` (interpolated), in its direction, over its range."""
    keep = np.isfinite(s.ys)
    xs, ys = s.xs[keep], s.ys[keep]
    span = float(ys.max() - ys.min()) or 1.0
    move = float(np.interp(b, xs, ys) - np.interp(a, xs, ys))
    return (move if s.direction == "up" else -move) / span


def stages(signals: Mapping[str, Signal], loss: str = "loss", merge: float = 2.0, flat: float = 0.1) -> list[dict]:
    """The run's stages (see the module method): ``[{"start", "end", "kind", "boundary_signals",
    "moved"}]`` where ``boundary_signals`` mark the stage's start and ``moved`` lists the signals
    that moved by more than ``flat`` of their range during it."""
    base = signals[loss]
    lo, hi = float(np.nanmin(base.xs)), float(np.nanmax(base.xs))
    marks = boundaries(signals, float(np.median(np.diff(np.sort(base.xs)))), merge)
    edges = [lo] + [m["at"] for m in marks] + [hi]
    starts = [[]] + [m["signals"] for m in marks]
    out = []
    for (a, b), why in zip(zip(edges[:-1], edges[1:]), starts):
        moved = [name for name, s in signals.items() if _change(s, a, b) > flat]
        if loss in moved:
            kind = "loss falls"
        elif any(name != loss for name in moved):
            kind = "loss flat while structure forms"
        else:
            kind = "loss flat"
        out.append({"start": a, "end": b, "kind": kind, "boundary_signals": why, "moved": moved})
    return out
