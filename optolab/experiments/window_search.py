"""Critical windows by search: the latest start and the earliest stop of a window in which a
clamp still changes the time by at least a stated effect, found by bisection to a stated
resolution instead of a grid of starts × lengths.

Rules:
- Positions are fractions of a reference *event* time ``T`` (``relative_to``: ``crossing``, the
  reference's median first crossing of the loss; ``drop_onset``, the median onset of its loss
  drop; ``plateau_onset``, the median start of the plateau before it; all from
  :mod:`optolab.measures.phase` via the runs' ``summary.json``), so windows read "from 0.6 T".
- **Latest start**: windows ``[s, end)`` (``end``: the search's upper bound ``hi`` × T). At
  ``s = 0`` the clamp is the whole run, which the confirmation found effective (holds); at
  ``s = hi`` it starts after every run has stopped or been censored (fails). Each probe
  halves the bracket: holds -> the answer is at or after ``s``; fails -> before it.
- **Earliest stop**: windows ``[0, e)``; ``e = 0`` is no clamp (fails), ``e = hi`` the whole
  clamp as far as the time is concerned (holds).
- A probe **holds** when the median paired ratio of its seeds to the reference's moves the time
  by at least ``effect`` in the confirmed direction: ratio ≥ 1 + effect for a delay, ≤
  1 / (1 + effect) for a speed-up (a censored condition seed counts as later than every time).
  The search assumes the effect shrinks as the window shrinks (monotone); a probe that breaks
  that is kept in ``probes`` so the report can show it.
- **Known ends.** A window that starts after the reference's runs have all crossed cannot move
  their times (each run is its reference until then), so the latest start's bracket may end at
  the probe seeds' latest reference crossing (``start_fails``) instead of ``hi``; a window
  that stops after the whole-clamp runs have all crossed leaves their times as the whole clamp's,
  so the earliest stop's may start at their latest crossing (``stop_holds``). Narrower brackets
  need fewer rounds (3 instead of 4 on the quickstart).
- It stops when the bracket is at most ``resolution`` (in units of T) wide: the answer is the
  bracket's inner end (the last start that held, the first stop that held) and the bracket is
  reported as its uncertainty. Both searches advance together, one probe each per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

EVENTS = ("crossing", "drop_onset", "plateau_onset")


@dataclass
class Bisection:
    """One boundary's bracket: ``good`` is a position where the effect holds, ``bad`` where it
    fails (``good < bad`` for a latest start, ``good > bad`` for an earliest stop)."""

    good: float
    bad: float
    resolution: float
    probes: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return abs(self.bad - self.good) <= self.resolution

    def next(self) -> float | None:
        """The next position to probe, or None when resolved."""
        return None if self.done else round((self.good + self.bad) / 2, 6)

    def record(self, x: float, holds: bool) -> None:
        self.probes.append((x, holds))
        if holds:
            self.good = x
        else:
            self.bad = x

    def result(self) -> dict:
        lo, hi = sorted((self.good, self.bad))
        return {"value": self.good, "bracket": [lo, hi], "probes": [list(p) for p in self.probes]}


def holds(ratio: float | None, direction: str, effect: float) -> bool:
    """Whether a probe's median ratio moves the time by at least ``effect`` in ``direction``
    (``delay`` or ``speedup``); ``None`` is a censored median: later than every time."""
    r = math.inf if ratio is None else ratio
    return r >= 1 + effect if direction == "delay" else r <= 1 / (1 + effect)


def window(start: float, stop: float, t: float, budget: int | None = None) -> dict | None:
    """A clamp's ``window`` in sequences for fractions ``start``/``stop`` of the event time ``t``,
    clipped to the ``budget`` (sequences: a stop at or past it is left open, "until the end");
    ``None`` when the window starts at or after the budget (it would clamp nothing)."""
    a = int(round(start * t))
    b = max(int(round(stop * t)), a + 1)
    if budget is not None and a >= budget:
        return None
    out = {"start": a, "stop": b, "unit": "sequences"}
    if budget is not None and b >= budget:
        del out["stop"]
    return out


def search(probe: Callable[[dict[str, tuple[float, float]]], Mapping[str, float | None]], direction: str,
           effect: float, hi: float, resolution: float, max_rounds: int = 20, *,
           start_fails: float | None = None, stop_holds: float | None = None) -> dict:
    """Run both bisections; ``probe({name: (start, stop)})`` returns each window's median ratio.
    (:mod:`optolab.experiments.discover` probes with sweeps; tests with a known response.)
    ``start_fails`` / ``stop_holds`` (T units, at most ``hi``): where each bracket's known end is
    when the runs already tell (module rules); default ``hi``."""
    bad_start = hi if start_fails is None else min(hi, start_fails)
    good_stop = hi if stop_holds is None else min(hi, stop_holds)
    start, stop = Bisection(0.0, bad_start, resolution), Bisection(good_stop, 0.0, resolution)
    for _ in range(max_rounds):
        asks = {}
        if (s := start.next()) is not None:
            asks["start"] = (s, hi)
        if (e := stop.next()) is not None:
            asks["stop"] = (0.0, e)
        if not asks:
            break
        got = probe(asks)
        if "start" in asks:
            start.record(asks["start"][0], holds(got["start"], direction, effect))
        if "stop" in asks:
            stop.record(asks["stop"][1], holds(got["stop"], direction, effect))
    return {"latest_start": start.result(), "earliest_stop": stop.result(), "resolution": resolution,
            "hi": hi, "known": {"start_fails": bad_start, "stop_holds": good_stop}, "direction": direction,
            "effect": effect}
