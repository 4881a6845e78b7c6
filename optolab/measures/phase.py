"""Phase-change detection: when does a curve drop (or rise), from what plateau, with what
uncertainty across seeds.

Method (per curve, values ``y`` at eval points ``x``; rising curves are negated first):
1. Smooth with a centred running median of ``window`` points (shrinking at the ends), so single
   noisy evals cannot fake or hide a drop.
2. Estimate the eval noise σ as 1.4826 × the median absolute residual ``|y − smooth|``.
3. Segment the smooth curve into alternating peaks and troughs whose swings are at least
   ``h = max(k_sigma · σ, min_fraction · span, min_drop)`` (a zig-zag filter with hysteresis
   ``h``; ``span`` is the smooth curve's range). A fall is split at an inner plateau (at least
   5 evals moving less than ``h/2``) when both parts still fall by ``h``: the
   initial fall to a plateau and the later phase change are two events (a plateau must also be
   4× flatter than the fall's steepest part, so a steady creep is not chopped up). Every resulting
   peak → trough fall is a drop *event*. A curve without one has **no phase change**; that is
   reported, never guessed.
4. For each event, ``onset``, ``midpoint`` and ``end`` are where the smooth curve first falls
   10 %, 50 % and 90 % of the way from the peak to the trough (linear interpolation between
   eval points). ``plateau`` is the median of the raw values from the previous trough (or the
   first eval) to where the fall has begun — the level the curve sat at before dropping.
5. Only *abrupt* events count as phase changes: onset to end within ``max_width`` (40 %) of
   the run's x range; a slow creep is listed but is not a phase change. The phase change of a
   curve is its largest abrupt event that follows a plateau of at least ``min_plateau`` evals.
   A plateau is both long and flat (before the fall has begun, the curve falls at under a
   third of the fall's steepest rate, or the fall was split off a plateau in step 3). The first fall from initialisation has no plateau before
   it, so it is listed but is not a phase change unless ``require_plateau=False`` (then a drop
   at the very start counts). A fall split off a plateau is measured from the plateau's level.

Measured on synthetic curves (the shapes of tests/test_phase.py, 100 noise seeds each): a
sigmoid drop after a plateau found within two evals, plateau level within 0.05: 300 of 300;
pure noise called a phase change: 3 of 100; two drops, both found: 100 of 100; a drop in the
last evals: 100 of 100; a steady creep wrongly called a phase change: 1 of 100 (small) and 3 of
100 (large); a large fall from initialisation, a slow creep, then the drop (a 15-label run's
shape): the late drop found within 40,000 sequences in 100 of 100.

Across seeds: :func:`summarize_times` gives the median and a percentile-bootstrap 95 % CI of the
median (``None``, "no phase change", counts as later than everything, so a median can be
``None`` too); :func:`ratio` gives median(condition) / median(reference) with a bootstrap CI
that resamples the seeds of both conditions independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Event:
    """One drop (or rise, for ``direction="up"``) of a curve, in the curve's own x units."""

    onset: float
    midpoint: float
    end: float
    plateau: float  # level before the event (raw values, median)
    start_level: float  # smooth value at the peak
    end_level: float  # smooth value at the trough
    size: float  # |start_level − end_level|
    abrupt: bool  # end − onset is at most ``max_width`` of the run's x range
    after_plateau: bool  # at least ``min_plateau`` evals before it since the previous event

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PhaseChange:
    """A curve's phase change (``event``, or None: no phase change) and every event found."""

    event: Event | None
    events: tuple[Event, ...]
    noise: float  # σ estimated from the residuals
    threshold: float  # hysteresis h used

    @property
    def found(self) -> bool:
        return self.event is not None


def running_median(y: np.ndarray, window: int) -> np.ndarray:
    half = max(window, 1) // 2
    return np.array([np.median(y[max(0, i - half): i + half + 1]) for i in range(len(y))])


def _swings(s: np.ndarray, h: float) -> list[tuple[int, int]]:
    """(peak, trough) index pairs of every fall of at least ``h`` in ``s``: a zig-zag filter
    that only turns after a move of ``h`` against the current trend."""
    drops: list[tuple[int, int]] = []
    trend, hi, lo, ext, peak = 0, 0, 0, 0, 0
    for i in range(1, len(s)):
        if trend == 0:  # no move of h yet: track the extremes since the start
            hi = i if s[i] > s[hi] else hi
            lo = i if s[i] < s[lo] else lo
            if s[hi] - s[i] >= h:
                trend, peak, ext = -1, hi, i
            elif s[i] - s[lo] >= h:
                trend, ext = 1, i
        elif trend == -1:  # falling from ``peak``; ``ext`` is the lowest point so far
            if s[i] < s[ext]:
                ext = i
            elif s[i] - s[ext] >= h:
                drops.append((peak, ext))
                trend, ext = 1, i
        else:  # rising; ``ext`` is the highest point so far
            if s[i] > s[ext]:
                ext = i
            elif s[ext] - s[i] >= h:
                trend, peak, ext = -1, ext, i
    if trend == -1:
        drops.append((peak, ext))
    return drops


def _steepest(s: np.ndarray, peak: int, trough: int, w: int) -> float:
    """The fastest fall per point of ``s`` over ``w``-point windows inside ``[peak, trough]``."""
    if trough - peak < w:
        return float(s[peak] - s[trough]) / max(trough - peak, 1)
    return max((s[k] - s[k + w]) / w for k in range(peak, trough - w + 1))


def _split_at_plateaus(s: np.ndarray, peak: int, trough: int, h: float, min_plateau: int, start: int | None = None
                       ) -> list[tuple[int, int, int]]:
    """Split a fall at its longest inner plateau — at least 5 (and ``min_plateau``) points that move less
    than ``h / 2`` and at under a quarter of the fall's steepest slope (so a steady creep is
    never split) — when the parts before and after each still fall by at least ``h``; recurse.
    Two drops separated by a flat stretch (and no rise) are two events. Returns
    ``(start, peak, trough)``: ``start`` is where the plateau before the fall begins (``peak``
    itself for a fall that was not split off a plateau)."""
    best = None
    min_len = max(min_plateau, 5)  # long enough that eval noise cannot fake a flat stretch
    w = max(min_plateau - 1, 1)
    steepest = _steepest(s, peak, trough, w) if trough - peak >= w else 0.0
    for i in range(peak + 1, trough):
        if s[peak] - s[i] < h:
            continue
        lo = hi = s[i]
        for j in range(i + 1, trough):
            lo, hi = min(lo, s[j]), max(hi, s[j])
            if hi - lo >= h / 2:
                break
            flat = (s[i] - s[j]) / (j - i) <= 0.25 * steepest  # much flatter than the fall's steepest part
            if flat and j - i + 1 >= min_len and s[j] - s[trough] >= h and (
                    best is None or j - i > best[1] - best[0]):
                best = (i, j)
    start = peak if start is None else start
    if best is None:
        return [(start, peak, trough)]
    i, j = best
    return (_split_at_plateaus(s, peak, i, h, min_plateau, start)
            + _split_at_plateaus(s, j, trough, h, min_plateau, i))


def _crossing(x: np.ndarray, s: np.ndarray, a: int, b: int, level: float) -> float:
    """First x in [x[a], x[b]] where the smooth curve falls to ``level`` (interpolated)."""
    for i in range(a + 1, b + 1):
        if s[i] <= level:
            if s[i - 1] == s[i]:
                return float(x[i])
            frac = (s[i - 1] - level) / (s[i - 1] - s[i])
            return float(x[i - 1] + min(max(frac, 0.0), 1.0) * (x[i] - x[i - 1]))
    return float(x[b])


def detect(x: Sequence[float], y: Sequence[float], *, direction: str = "down", window: int = 5,
           k_sigma: float = 6.0, min_fraction: float = 0.2, min_drop: float = 0.0,
           min_plateau: int = 3, max_width: float = 0.4, require_plateau: bool = True) -> PhaseChange:
    """The phase change of one curve (see the module rules)."""
    if direction not in ("down", "up"):
        raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if len(xs) < 3:
        return PhaseChange(None, (), math.nan, math.nan)
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    sign = 1.0 if direction == "down" else -1.0
    v = sign * ys
    s = running_median(v, window)
    noise = float(1.4826 * np.median(np.abs(v - s)))
    span = float(s.max() - s.min())
    h = max(k_sigma * noise, min_fraction * span, min_drop, 1e-12)
    events = []
    prev_trough = 0
    w = max(min_plateau - 1, 1)
    falls = [part for peak, trough in _swings(s, h) for part in _split_at_plateaus(s, peak, trough, h, min_plateau)]
    for start, peak, trough in falls:
        # A fall split off a plateau is measured from the plateau's level (its median), not from
        # where the flat stretch ended: that end already lies a little way into the fall.
        top = s[peak] if start == peak else max(float(np.median(s[start: peak + 1])), s[peak])
        bottom = s[trough]
        size = top - bottom
        # the plateau runs from the previous trough to where this fall has begun (10 %), so a
        # noisy maximum early on the plateau does not shorten it
        begun = next(i for i in range(start, trough + 1) if s[i] <= top - 0.1 * size)
        before = v[prev_trough: max(begun, prev_trough + 1)]
        onset = _crossing(xs, s, start, trough, top - 0.1 * size)
        end = _crossing(xs, s, start, trough, top - 0.9 * size)
        # A plateau is long (``min_plateau`` evals before the fall has begun) and flat. A fall
        # split off a plateau has one by construction; any other must fall, before it has
        # begun, at under a third of its steepest rate. The first fall from initialisation is
        # steep from its first eval (measured: 0.45-0.85 of the steepest rate on the Singh runs;
        # a short plateau near ln 5 under the layer-1 clamp: 0.23-0.29).
        flat = start != peak or (
            (s[prev_trough] - s[begun]) / max(begun - prev_trough, 1) <= _steepest(s, peak, trough, w) / 3)
        events.append(Event(
            onset=onset, midpoint=_crossing(xs, s, start, trough, top - 0.5 * size), end=end,
            plateau=float(sign * np.median(before)), start_level=float(sign * top),
            end_level=float(sign * bottom), size=float(size),
            abrupt=bool(end - onset <= max_width * (xs[-1] - xs[0])),
            after_plateau=bool(begun - prev_trough >= min_plateau and flat)))
        prev_trough = trough
    pool = [e for e in events if e.abrupt and (e.after_plateau or not require_plateau)]
    main = max(pool, key=lambda e: (e.after_plateau, e.size)) if pool else None
    return PhaseChange(main, tuple(events), noise, h)


# --- across seeds ---------------------------------------------------------------------------


def _median_inf(values: np.ndarray) -> float:
    """Lower median with ``inf`` for "never"."""
    ranked = np.sort(values)
    return float(ranked[(len(ranked) - 1) // 2])


def summarize_times(times: Sequence[float | None], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """``{"n", "n_found", "median", "ci_low", "ci_high"}`` over seeds; ``None`` means never
    (and a statistic that lands on "never" is ``None``)."""
    vals = np.array([math.inf if t is None else float(t) for t in times], dtype=float)
    if not len(vals):
        return {"n": 0, "n_found": 0, "median": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    boots = np.array([_median_inf(rng.choice(vals, len(vals))) for _ in range(n_boot)])
    lo, hi = np.quantile(boots, [0.025, 0.975], method="inverted_cdf")

    def finite(v: float) -> float | None:
        return None if math.isinf(v) else float(v)

    return {"n": len(vals), "n_found": int(np.isfinite(vals).sum()), "median": finite(_median_inf(vals)),
            "ci_low": finite(lo), "ci_high": finite(hi)}


def ratio(times: Sequence[float | None], reference: Sequence[float | None], *, n_boot: int = 2000,
          seed: int = 0) -> dict:
    """median(times) / median(reference) with a bootstrap 95 % CI (seeds resampled
    independently in each condition); ``None`` where a median is "never" or zero."""
    a = np.array([math.inf if t is None else float(t) for t in times], dtype=float)
    b = np.array([math.inf if t is None else float(t) for t in reference], dtype=float)

    def r(x: np.ndarray, y: np.ndarray) -> float:
        mx, my = _median_inf(x), _median_inf(y)
        if not (math.isfinite(mx) and math.isfinite(my)) or my == 0:
            return math.nan
        return mx / my

    rng = np.random.default_rng(seed)
    boots = np.array([r(rng.choice(a, len(a)), rng.choice(b, len(b))) for _ in range(n_boot)])
    point = r(a, b)
    ok = boots[np.isfinite(boots)]
    if math.isnan(point) or len(ok) < 0.95 * n_boot:
        return {"ratio": None if math.isnan(point) else point, "ci_low": None, "ci_high": None}
    lo, hi = np.quantile(ok, [0.025, 0.975])
    return {"ratio": point, "ci_low": float(lo), "ci_high": float(hi)}
