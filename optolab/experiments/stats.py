"""Statistics over seeds that a reviewer can check: crossing times, medians, paired effects with
bootstrap CIs, and survival curves of transition times with censoring.

Rules:
- **Crossing time** (:func:`crossing_time`): the first x (in the units of ``xs``, e.g. sequences)
  at which a curve is at or below ``threshold`` (at or above for ``direction="up"``). By default
  it is **interpolated linearly** between the last eval above the threshold and the first eval at
  or below it, so times are not quantised to the eval spacing (:data:`INTERPOLATION_NOTE` says so
  in words for a report). ``interpolate=False`` gives the first eval at or below — what
  :func:`optolab.training.summary.first_below` reports, except that it asks for strictly below
  (the two differ only for an eval exactly on the threshold). Evals with a NaN value or x are
  skipped, so interpolation bridges them.
- **Censoring.** A curve that never crosses by its last eval is *right-censored* there:
  ``time=None, censored_at=<last x>``; it is counted as "never", not dropped. A curve already
  crossed at its first eval is *left-censored*: ``time=<first x>, left=True`` (it crossed at or
  before then; the time is an upper bound).
- **Never** (in :func:`median`, :func:`paired_effect`, :func:`effects_table`): a time given as
  ``None``, NaN or ``inf`` means "never crossed by the last eval" and ranks above every finite
  time.
- **Median** (:func:`median`): the ordinary median — the middle value, or the mean of the two
  middle values for an even count (not the lower median, which with two seeds is the minimum).
  The mean of a finite time and "never" is "never"; a median that is "never" is ``None``.
- **Paired effect** (:func:`paired_effect`): runs of two conditions with the same seed share
  initialisation and data, so the effect is measured *per seed* — ``cond / ref``
  (``kind="ratio"``) or ``cond − ref`` (``kind="difference"``) — over the seeds present in both
  (the others are named in ``unpaired``), and summarised by the ordinary median of the per-seed
  effects.
- **Censored pairs are bounded, never guessed.** A side that never crossed is *right-censored*:
  its time is only known to lie after its censoring point — the run's last eval, given as
  ``cond_censored_at`` / ``ref_censored_at`` (``seed -> x``); without one, the largest finite
  time of the comparison (the assumption that every run had the same budget, so "never" is later
  than every time observed). A pair's effect is then an interval:

  ==================  ==================  ==============================  ==============================
  cond                ref                 ratio                           difference
  ==================  ==================  ==============================  ==============================
  finite c            finite r            c / r                           c − r
  never (after C)     finite r            [C / r, +inf)                   [C − r, +inf)
  finite c            never (after C)     (0, c / C]                      (−inf, c − C]
  never               never               undefined: excluded, counted in ``n_undefined``
  ==================  ==================  ==============================  ==============================

  The median is monotone, so the median effect lies between the median of the intervals' lower
  ends and the median of their upper ends (``effect_low``, ``effect_high``). ``effect`` is the
  median only when the two agree (censoring does not reach the middle); otherwise it is ``None``
  and ``warning`` says the effect cannot be said, why (which side never crossed, in how many
  seeds) and between which bounds it lies. ``per_seed`` keeps each pair's direction (``+inf``,
  ``0`` for a ratio or ``-inf`` for a difference on a censored pair) and ``per_seed_bounds`` its
  interval. A ratio with a reference time of 0 is ``+inf`` (cond > 0) or undefined (cond = 0).
  (One seed of two whose reference never crossed once turned every condition into "ratio 0.635
  [0, 1.27]", the mean of a real ratio and a censored 0, which reads as a speed-up.)
- **Bootstrap**: percentile bootstrap over seeds. Each of ``n_boot`` resamples draws the
  ``n_pairs`` pairs with replacement — a seed's two times travel together, which is what makes it
  paired and removes the seed-to-seed spread both conditions share — and takes the ordinary
  median of its per-seed effects' lower ends and of their upper ends (the same for uncensored
  pairs). The CI is the ``(1 − level)/2`` quantile of the lower medians and the ``(1 + level)/2``
  quantile of the upper medians by the inverted CDF (so censoring can only widen it) (each end is an actual resample median, so an
  infinite end stays infinite instead of turning NaN). An end at ±inf is reported as ``None``:
  unbounded. A resample whose median is undefined (its two middle effects are ``-inf`` and
  ``+inf``, possible only for a difference) counts as ``-inf`` for the lower end and ``+inf`` for
  the upper, which can only widen the CI. The generator is ``numpy.random.default_rng(seed)``:
  the same inputs and seed give the same CI; there is no global state.
- **Too few seeds.** With ``n`` pairs and no assumption about the distribution of effects, the
  strongest evidence possible is "every seed moved the same way", which with no effect at all
  happens by chance with probability ``2 · 2^-n`` (50 % for 2 seeds, 25 % for 3, 6.25 % for 5,
  3.1 % for 6). No honest 95 % interval can exclude "no effect" before that is ≤ 5 %, i.e.
  before **6 pairs** (:func:`min_pairs`). The percentile bootstrap does not know this: for
  ``n ≤ 5`` its ends are exactly the smallest and largest per-seed effects (the resample median
  equals the sample minimum with probability P(Binomial(n, 1/n) ≥ ⌊n/2⌋ + 1) = 25 %, 26 %, 5.1 %,
  5.8 % for n = 2…5, all above 2.5 %, and 0.87 % for n = 6) — with 2 pairs there are only 3
  distinct resamples and the "95 % CI" is the range of two numbers. So below :func:`min_pairs`
  the CI is still given but ``resolved`` is ``False`` and ``warning`` says why.
- **Survival** (:func:`survival`): the Kaplan–Meier estimate of the fraction of runs not yet
  crossed, with runs that never crossed right-censored at their last eval (at ``+inf`` when that
  is not known). At a time with both crossings and censorings, the crossings come first (the
  usual convention: a run censored at t was at risk at t). :func:`ecdf` is ``1 − survival``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

INTERPOLATION_NOTE = ("Crossing times are interpolated linearly between the last eval above the threshold and "
                      "the first eval at or below it; runs that never crossed are censored at their last eval.")


@dataclass(frozen=True)
class Crossing:
    """When a curve crossed its threshold: ``time`` (``None`` if it never did), ``censored_at``
    (the last x, for a curve that never crossed) and ``left`` (it had crossed by its first eval,
    so ``time`` is an upper bound)."""

    time: float | None
    censored_at: float | None
    left: bool = False

    @property
    def crossed(self) -> bool:
        return self.time is not None


def crossing_time(xs: Sequence[float], values: Sequence[float], threshold: float, *, interpolate: bool = True,
                  direction: Literal["down", "up"] = "down") -> Crossing:
    """The first x at which ``values`` is at or below ``threshold`` (at or above for
    ``direction="up"``), interpolated between evals unless ``interpolate=False`` (module rules)."""
    if direction not in ("down", "up"):
        raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
    x = np.asarray(xs, dtype=float)
    v = np.asarray(values, dtype=float)
    if x.shape != v.shape or x.ndim != 1:
        raise ValueError(f"xs and values must be 1-d and of one length, not {x.shape} and {v.shape}")
    keep = ~(np.isnan(x) | np.isnan(v))
    x, v = x[keep], v[keep]
    if not len(x):
        return Crossing(None, None)
    order = np.argsort(x, kind="stable")
    x, v = x[order], v[order]
    # a rising curve is a falling one upside down, so one rule serves both
    if direction == "up":
        v, threshold = -v, -threshold
    hit = np.flatnonzero(v <= threshold)
    if not len(hit):
        return Crossing(None, float(x[-1]))
    i = int(hit[0])
    if i == 0:
        return Crossing(float(x[0]), None, left=True)
    if not interpolate:
        return Crossing(float(x[i]), None)
    # v[i-1] > threshold >= v[i], so the denominator is positive and the fraction lies in (0, 1]
    frac = (v[i - 1] - threshold) / (v[i - 1] - v[i])
    return Crossing(float(x[i - 1] + frac * (x[i] - x[i - 1])), None)


def _never_as_inf(t: Any) -> float:
    if t is None:
        return math.inf
    t = float(t)
    return math.inf if math.isnan(t) else t


def _middle(ranked: np.ndarray) -> np.ndarray:
    """Ordinary median along the last axis of already sorted values (±inf allowed; the middle pair
    ``-inf, +inf`` gives NaN: undefined)."""
    n = ranked.shape[-1]
    with np.errstate(invalid="ignore"):
        return (ranked[..., (n - 1) // 2] + ranked[..., n // 2]) / 2


def median(values: Sequence[float | None]) -> float | None:
    """The ordinary median, "never" (``None``/NaN/inf) ranking above every finite time; ``None``
    when it lands on "never" or there are no values."""
    vals = np.sort(np.array([_never_as_inf(v) for v in values], dtype=float))
    if not len(vals):
        return None
    m = float(_middle(vals))
    return m if math.isfinite(m) else None


def min_pairs(level: float = 0.95) -> int:
    """The fewest pairs at which a ``level`` interval can exclude "no effect" without assuming a
    distribution: the smallest ``n`` with ``2 · 2^-n ≤ 1 − level`` (6 at 95 %, 8 at 99 %)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, not {level}")
    n = 1
    while 2.0 ** (1 - n) > 1 - level:
        n += 1
    return n


def _effect(c: float, r: float, kind: str) -> float:
    """Per-seed effect of times ``c`` (condition) and ``r`` (reference), inf = never; NaN =
    undefined; a censored pair gives its bound's direction (module rules)."""
    if math.isinf(c) and math.isinf(r):
        return math.nan
    if kind == "difference":
        return c - r  # never - finite = +inf, finite - never = -inf
    if math.isinf(c):
        return math.inf
    if math.isinf(r):
        return 0.0
    if r == 0:
        return math.inf if c > 0 else math.nan
    return c / r


def _bounds(c: float, r: float, cc: float, rc: float, kind: str) -> tuple[float, float]:
    """The interval a pair's effect lies in: ``c``/``r`` the times (inf = never), ``cc``/``rc``
    the points after which a never-crossed side would cross (module rules); NaN: undefined."""
    e = _effect(c, r, kind)
    if math.isnan(e) or (math.isfinite(c) and math.isfinite(r)):
        return e, e
    if math.isinf(c):  # the condition crossed after cc, if ever
        return (cc - r if kind == "difference" else (cc / r if r > 0 else math.inf)), math.inf
    # the reference crossed after rc, if ever
    return -math.inf if kind == "difference" else 0.0, (c - rc if kind == "difference" else
                                                        (c / rc if rc > 0 else math.inf))


def _null(kind: str) -> float:
    return 1.0 if kind == "ratio" else 0.0


def _bounded(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _percentile_ci(boots: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile CI of bootstrap medians; undefined (NaN) ones count against both ends."""
    alpha = (1 - level) / 2
    lo = np.quantile(np.where(np.isnan(boots), -math.inf, boots), alpha, method="inverted_cdf")
    hi = np.quantile(np.where(np.isnan(boots), math.inf, boots), 1 - alpha, method="inverted_cdf")
    return float(lo), float(hi)


def _check(kind: str, n_boot: int, level: float) -> None:
    if kind not in ("ratio", "difference"):
        raise ValueError(f"kind must be 'ratio' or 'difference', not {kind!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, not {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, not {level}")


def paired_effect(cond: Mapping[Any, float | None], ref: Mapping[Any, float | None], *,
                  kind: Literal["ratio", "difference"] = "ratio", n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95, cond_censored_at: Mapping[Any, float | None] | None = None,
                  ref_censored_at: Mapping[Any, float | None] | None = None) -> dict:
    """The per-seed paired effect of ``cond`` against ``ref`` (both ``seed -> time``, ``None`` =
    never), its ordinary median and percentile-bootstrap CI over seeds, censored pairs bounded
    (module rules). ``cond_censored_at`` / ``ref_censored_at``: ``seed -> last eval`` of runs
    that never crossed.

    Returns ``{"kind", "level", "effect", "effect_low", "effect_high", "ci_low", "ci_high",
    "resolved", "n_pairs", "n_censored", "censored", "n_undefined", "unpaired", "per_seed",
    "per_seed_bounds", "min_pairs", "warning"}``: ``effect`` is ``None`` when the median is
    infinite, undefined or only bounded (``effect_low``/``effect_high``: the bounds, ``None``
    when unbounded); a CI end is ``None`` when unbounded; ``resolved`` is true when the CI
    excludes no effect (1 for a ratio, 0 for a difference) and there are at least
    :func:`min_pairs` pairs; ``per_seed`` maps every seed in both conditions to its effect (±inf
    or a ratio of 0 when censored, ``None`` when undefined), ``per_seed_bounds`` to its interval;
    ``n_pairs`` counts the pairs with an effect, ``n_censored`` those among them where one
    condition never crossed (``censored``: ``{"condition": n, "reference": n}``), ``n_undefined``
    the excluded ones; ``unpaired`` lists the seeds in only one condition; ``warning`` is plain
    English, or ``None``.
    """
    _check(kind, n_boot, level)
    common = [s for s in cond if s in ref]
    lone = set(cond) ^ set(ref)
    try:
        unpaired = sorted(lone)
    except TypeError:  # seeds of mixed types: still a stable order
        unpaired = sorted(lone, key=repr)
    pairs = {s: (_never_as_inf(cond[s]), _never_as_inf(ref[s])) for s in common}
    per_seed = {s: _effect(c, r, kind) for s, (c, r) in pairs.items()}
    finite = [t for pair in pairs.values() for t in pair if math.isfinite(t)]
    latest = max(finite, default=math.inf)  # "never" is later than every time seen (same budgets)

    def after(given: Mapping | None, s: Any) -> float:
        x = None if given is None else given.get(s)
        return latest if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    bounds = {s: _bounds(c, r, after(cond_censored_at, s), after(ref_censored_at, s), kind)
              for s, (c, r) in pairs.items()}
    censored = {"condition": sum(math.isinf(c) and not math.isinf(r) for c, r in pairs.values()),
                "reference": sum(math.isinf(r) and not math.isinf(c) for c, r in pairs.values())}
    kept = [s for s in pairs if not math.isnan(per_seed[s])]
    lows = np.array([bounds[s][0] for s in kept], dtype=float)
    highs = np.array([bounds[s][1] for s in kept], dtype=float)
    n = len(kept)
    need = min_pairs(level)
    out = {"kind": kind, "level": level, "effect": None, "effect_low": None, "effect_high": None,
           "ci_low": None, "ci_high": None, "resolved": False, "n_pairs": n,
           "n_censored": censored["condition"] + censored["reference"], "censored": censored,
           "n_undefined": len(common) - n, "unpaired": unpaired,
           "per_seed": {s: None if math.isnan(e) else e for s, e in per_seed.items()},
           "per_seed_bounds": {s: (None, None) if math.isnan(b[0]) else b for s, b in bounds.items()},
           "min_pairs": need, "warning": None}
    if n == 0:
        out["warning"] = _paired_warning(out, kind, level, censored, None, None)
        return out
    low, high = float(_middle(np.sort(lows))), float(_middle(np.sort(highs)))
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, n, size=(n_boot, n))
    lo, _ = _percentile_ci(_middle(np.sort(lows[draw], axis=1)), level)
    _, hi = _percentile_ci(_middle(np.sort(highs[draw], axis=1)), level)
    null = _null(kind)
    point = low if low == high else math.nan
    out.update(effect=_bounded(point), effect_low=_bounded(low), effect_high=_bounded(high),
               ci_low=_bounded(lo), ci_high=_bounded(hi), resolved=bool(n >= need and (lo > null or hi < null)))
    out["warning"] = _paired_warning(out, kind, level, censored, low, high)
    return out


def _paired_warning(out: dict, kind: str, level: float, censored: dict, low: float | None,
                    high: float | None) -> str | None:
    """:func:`paired_effect`'s plain-English warning: seeds left out, too few pairs, a median
    that is only bounded or censored (``low``/``high`` are ``None`` when no seed has an effect)."""
    notes = []
    n, need, unpaired = out["n_pairs"], out["min_pairs"], out["unpaired"]
    if unpaired:
        notes.append(f"{len(unpaired)} seed(s) ran in only one condition and are left out")
    if out["n_undefined"]:
        why = "neither condition crossed" + (", or both crossed at 0" if kind == "ratio" else "")
        notes.append(f"{out['n_undefined']} seed(s) have no effect ({why}) and are left out")
    if n == 0:
        notes.append("no seed has an effect in both conditions, so there is nothing to estimate")
        return "; ".join(notes) + "."
    if n < need:
        notes.append(f"with {n} paired seed(s) the {level:.0%} CI cannot resolve effects: below {need} pairs a "
                     f"percentile bootstrap CI is the range of the per-seed effects, which excludes 'no effect' "
                     f"whenever every seed moves the same way, and with no effect at all that happens "
                     f"{2.0 ** (1 - n):.0%} of the time")
    if low != high:
        sides = [f"the {side} never crossed in {k} seed(s)" for side, k in
                 (("reference", censored["reference"]), ("condition", censored["condition"])) if k]
        notes.append("cannot say: " + " and ".join(sides) + f", so the median effect is only bounded: between "
                     f"{_words(low)} and {_words(high)}")
    elif not math.isfinite(low):
        notes.append("the median seed's effect is censored (a condition never crossed), so it has no finite value")
    return "; ".join(notes) + "." if notes else None


def _words(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else ("+inf" if v > 0 else "-inf")


def unpaired_effect(cond: Sequence[float | None], ref: Sequence[float | None], *,
                    kind: Literal["ratio", "difference"] = "ratio", n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """median(cond) / median(ref) (or −) with a percentile-bootstrap CI that resamples each
    condition's seeds independently: for conditions that share no seeds, and to show how much
    pairing narrows the CI. ``{"kind", "level", "effect", "ci_low", "ci_high"}``, the same
    conventions as :func:`paired_effect` (ordinary medians, "never" as inf)."""
    _check(kind, n_boot, level)
    a = np.sort(np.array([_never_as_inf(t) for t in cond], dtype=float))
    b = np.sort(np.array([_never_as_inf(t) for t in ref], dtype=float))
    out = {"kind": kind, "level": level, "effect": None, "ci_low": None, "ci_high": None}
    if not (len(a) and len(b)):
        return out
    rng = np.random.default_rng(seed)
    ma = _middle(np.sort(a[rng.integers(0, len(a), size=(n_boot, len(a)))], axis=1))
    mb = _middle(np.sort(b[rng.integers(0, len(b), size=(n_boot, len(b)))], axis=1))
    boots = np.array([_effect(x, y, kind) for x, y in zip(ma, mb)])
    lo, hi = _percentile_ci(boots, level)
    point = _effect(float(_middle(a)), float(_middle(b)), kind)
    out.update(effect=None if math.isnan(point) else _bounded(point), ci_low=_bounded(lo), ci_high=_bounded(hi))
    return out


def survival(times: Sequence[float | None], censored_at: Sequence[float | None] | None = None
             ) -> list[tuple[float, float]]:
    """Kaplan–Meier fraction of runs not yet crossed: ``[(x, S(x))]`` at every distinct crossing
    or censoring time, ``S`` holding from ``x`` up to the next point (1 before the first).

    ``times[i]`` is run i's crossing time, or ``None``/NaN/inf if it never crossed; then
    ``censored_at[i]`` is its last eval (``None`` or no ``censored_at``: censored at ``+inf``,
    i.e. at risk past every crossing). A run is never dropped."""
    if censored_at is not None and len(censored_at) != len(times):
        raise ValueError(f"censored_at has {len(censored_at)} entries for {len(times)} times")
    events, censor = [], []
    for i, t in enumerate(times):
        t = _never_as_inf(t)
        if math.isfinite(t):
            events.append(t)
        else:
            c = None if censored_at is None else censored_at[i]
            censor.append(_never_as_inf(c))
    ev = np.array(events, dtype=float)
    ce = np.array(censor, dtype=float)
    at_risk = len(ev) + len(ce)
    s = 1.0
    out = []
    for x in np.unique(np.concatenate([ev, ce[np.isfinite(ce)]])):
        d = int((ev == x).sum())
        if d:
            s *= 1 - d / at_risk
        out.append((float(x), s))
        # crossings at x leave the risk set before the runs censored at x do (they were at risk at x)
        at_risk -= d + int((ce == x).sum())
    return out


def ecdf(times: Sequence[float | None], censored_at: Sequence[float | None] | None = None
         ) -> list[tuple[float, float]]:
    """The fraction of runs crossed by x, ``1 −`` :func:`survival` (same points, same censoring)."""
    return [(x, 1 - s) for x, s in survival(times, censored_at)]


def _point_of(run: Mapping[str, Any]) -> str:
    """The grid point of a run: its group without the condition's name (the sweep's run ids are
    ``{condition}{__field-value…}_s{seed}`` and its groups the same without ``_s{seed}``)."""
    group, condition = str(run.get("group", run["condition"])), str(run["condition"])
    if not group.startswith(condition):
        raise ValueError(f"group {group!r} does not start with its condition {condition!r}")
    return group[len(condition):]


def effects_table(runs: Sequence[Mapping[str, Any]], reference: str | None, time_key: str, *, n_boot: int = 2000,
                  seed: int = 0, level: float = 0.95, censored_key: str | None = None) -> list[dict]:
    """One row per condition × grid point: the ordinary median of ``time_key`` over seeds and,
    against ``reference`` at the same grid point, the paired ratio and difference with their CIs.

    ``runs`` are the report's per-run rows: ``condition``, ``group`` (condition + grid-point
    suffix, as in ``sweep.json``), ``seed`` and ``time_key`` (``None``/NaN = never). Rows, in
    first-seen order: ``condition``, ``group``, ``point`` (the suffix), ``n_seeds``,
    ``n_crossed``, ``median``, and — for a condition other than the reference, at a point the
    reference has — ``ratio``, ``ratio_ci_low``, ``ratio_ci_high``, ``ratio_resolved``,
    ``difference``, ``difference_ci_low``, ``difference_ci_high``, ``difference_resolved``,
    ``n_pairs``, ``n_censored``, ``n_censored_reference``, ``n_undefined``, ``ratio_low`` /
    ``ratio_high`` (the bounds of a ratio that censoring leaves only bounded) and ``warning``
    (from the ratio; both kinds pair the same seeds). ``censored_key``: each run's censoring point
    (its last eval) where it never crossed; without it, "never" is later than every time seen.
    Every row's values are plain Python (``None`` for blanks), ready for a DataFrame."""
    cells: dict[tuple[str, str], dict] = {}
    after: dict[tuple[str, str], dict] = {}
    groups: dict[tuple[str, str], str] = {}
    for run in runs:
        key = (str(run["condition"]), _point_of(run))
        times = cells.setdefault(key, {})
        if run["seed"] in times:
            raise ValueError(f"seed {run['seed']} appears twice in {key[0]}{key[1]}: pairing by seed needs one each")
        times[run["seed"]] = run.get(time_key)
        after.setdefault(key, {})[run["seed"]] = run.get(censored_key) if censored_key else None
        groups[key] = str(run.get("group", key[0] + key[1]))
    rows = []
    for (condition, point), times in cells.items():
        t = [_never_as_inf(v) for v in times.values()]
        row = {"condition": condition, "group": groups[condition, point], "point": point, "n_seeds": len(t),
               "n_crossed": sum(math.isfinite(v) for v in t), "median": median(t)}
        base = cells.get((reference, point)) if reference is not None and condition != reference else None
        if base is not None:
            effects = {kind: paired_effect(times, base, kind=kind, n_boot=n_boot, seed=seed, level=level,
                                           cond_censored_at=after[condition, point],
                                           ref_censored_at=after[reference, point])
                       for kind in ("ratio", "difference")}
            for kind, e in effects.items():
                row.update({kind: e["effect"], f"{kind}_ci_low": e["ci_low"], f"{kind}_ci_high": e["ci_high"],
                            f"{kind}_resolved": e["resolved"]})
            e = effects["ratio"]
            row.update(n_pairs=e["n_pairs"], n_censored=e["n_censored"],
                       n_censored_reference=e["censored"]["reference"], n_undefined=e["n_undefined"],
                       ratio_low=e["effect_low"], ratio_high=e["effect_high"], warning=e["warning"])
        rows.append(row)
    return rows
