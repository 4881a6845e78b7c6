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
   kind comes from the main loss over it, judged against the loss's *local* change, not the
   run's: ``loss falls`` where at least half the stage lies inside one of the loss's own abrupt
   events (onset to end: where the detector says the loss is falling, 10 % to 90 % of that fall)
   and the loss keeps at least a third of that event's mean pace there (``PACE``: an event's
   slow tail is not a fall; a first event that begins within its own width of the run's start is
   the fall from initialisation and reaches back to the start). Otherwise ``loss flat`` (a
   plateau's slow creep included), and ``loss flat while structure forms`` where another signal
   moved: by the same test on its own events, or by more than ``flat`` (10 %) of its range over
   the stage (a score that forms slowly on a plateau, Hoogland et al.'s first stage). Each stage lists the signals that moved.
   (The old rule, a loss move of 10 % of the run's total drop, called the tail of the main run's
   drop ``loss flat``: 0.21 → 0.07 is two thirds of the loss there but under 10 % of the fall
   from 1.6; and a plateau creeping 0.95 → 0.65 ``loss falls``.)
4. Adjacent stages of the same kind are one stage: a boundary between two spans that read the
   same (a head-score event inside the drop, say) is listed in the merged stage's
   ``inner_boundaries``, not as a stage of its own.
5. Nothing is guessed: a run whose signals show no event is one stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from optolab.measures.phase import detect

PACE = 1 / 3  # inside an event, a stage moves when it keeps a third of the event's mean pace


@dataclass(frozen=True)
class Signal:
    xs: np.ndarray
    ys: np.ndarray
    direction: str  # "down" or "up": where its structure moves


def abrupt_events(signals: Mapping[str, Signal], flat: float = 0.1) -> dict[str, list[tuple[float, float, float]]]:
    """Each signal's abrupt events of at least ``flat`` of its range, as ``(onset, end, pace)``
    with ``pace`` the event's mean move per sequence from onset to end, as a fraction of the
    signal's range (see the module method)."""
    out = {}
    for name, s in signals.items():
        keep = np.isfinite(s.ys)
        span = float(np.ptp(s.ys[keep])) if keep.any() else 0.0
        out[name] = [(float(e.onset), float(e.end), 0.8 * e.size / span / max(e.end - e.onset, 1e-12))
                     for e in detect(s.xs, s.ys, direction=s.direction, require_plateau=False).events
                     if e.abrupt and span > 0 and e.size >= flat * span]
    return out


def boundaries(signals: Mapping[str, Signal], spacing: float, merge: float = 2.0,
               events: Mapping[str, list[tuple[float, float, float]]] | None = None) -> list[dict]:
    """Candidate boundaries merged (see the module method): ``[{"at", "signals"}]`` in order;
    ``spacing`` is the eval interval ``merge`` counts in."""
    events = abrupt_events(signals) if events is None else events
    found = []
    lo = min(float(np.nanmin(s.xs)) for s in signals.values())
    hi = max(float(np.nanmax(s.xs)) for s in signals.values())
    for name in signals:
        for onset, end, _ in events[name]:
            found += [(onset, f"{name} onset"), (end, f"{name} end")]
    found.sort()
    out: list[list[tuple[float, str]]] = []
    for x, name in found:
        if out and x - out[-1][-1][0] <= merge * spacing:
            out[-1].append((x, name))
        else:
            out.append([(x, name)])
    return [{"at": float(np.median([x for x, _ in group])), "signals": [n for _, n in group]} for group in out
            if lo < float(np.median([x for x, _ in group])) < hi]


def _moved(s: Signal, spans: list[tuple[float, float, float]], a: float, b: float, flat: float | None) -> bool:
    """Whether the signal moved over ``[a, b]`` (see the module method): at least half of
    ``[a, b]`` inside one of its events while moving at a third of that event's pace or more,
    or (``flat`` not None) by more than ``flat`` of its range."""
    change = _change(s, a, b)
    if flat is not None and change > flat:
        return True
    for onset, end, pace in spans:
        inside = max(0.0, min(b, end) - max(a, onset))
        if b > a and inside >= 0.5 * (b - a) and change / (b - a) >= PACE * pace:
            return True
    return False


def _change(s: Signal, a: float, b: float) -> float:
    """The signal's move from ``a`` to ``b`` (interpolated), in its direction, over its range."""
    keep = np.isfinite(s.ys)
    xs, ys = s.xs[keep], s.ys[keep]
    span = float(ys.max() - ys.min()) or 1.0
    move = float(np.interp(b, xs, ys) - np.interp(a, xs, ys))
    return (move if s.direction == "up" else -move) / span


def stages(signals: Mapping[str, Signal], loss: str = "loss", merge: float = 2.0, flat: float = 0.1) -> list[dict]:
    """The run's stages (see the module method): ``[{"start", "end", "kind", "boundary_signals",
    "moved", "inner_boundaries"}]`` where ``boundary_signals`` mark the stage's start, ``moved``
    lists the signals that moved during it and ``inner_boundaries`` the boundaries merged away
    (``[{"at", "signals"}]``)."""
    base = signals[loss]
    lo, hi = float(np.nanmin(base.xs)), float(np.nanmax(base.xs))
    events = abrupt_events(signals, flat)
    marks = boundaries(signals, float(np.median(np.diff(np.sort(base.xs)))), merge, events)
    edges = [lo] + [m["at"] for m in marks] + [hi]
    starts = [[]] + [m["signals"] for m in marks]
    # a first event that begins within its own width of the run's start is the fall (or rise)
    # from initialisation: the evals before its onset belong to it (no plateau precedes it)
    spans = {name: [(lo if i == 0 and onset - lo <= end - onset else onset, end, pace)
                    for i, (onset, end, pace) in enumerate(evs)] for name, evs in events.items()}
    out: list[dict] = []
    for (a, b), why in zip(zip(edges[:-1], edges[1:]), starts):
        # the loss by its own events only: its slow creep on a plateau is not a fall
        moved = [name for name, s in signals.items() if _moved(s, spans[name], a, b, None if name == loss else flat)]
        if loss in moved:
            kind = "loss falls"
        elif moved:
            kind = "loss flat while structure forms"
        else:
            kind = "loss flat"
        if out and out[-1]["kind"] == kind:  # the same reading on both sides: one stage
            prev = out[-1]
            prev["inner_boundaries"].append({"at": a, "signals": why})
            prev["end"] = b
            prev["moved"] += [m for m in moved if m not in prev["moved"]]
            continue
        out.append({"start": a, "end": b, "kind": kind, "boundary_signals": why, "moved": moved,
                    "inner_boundaries": []})
    return out
