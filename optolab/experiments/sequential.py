"""Sequential seeds and family-wise verdicts: give more seed pairs only to conditions whose
answer is still open, and say which effects survive multiple comparisons.

Rules:
- **Verdict of one condition** (:func:`verdict`), from its paired effect against the reference
  (:func:`optolab.experiments.stats.paired_effect`, ratio of times, percentile-bootstrap CI) and
  its exact signed-rank p-value: ``effect`` when the CI excludes 1 with at least
  :func:`~optolab.experiments.stats.min_pairs` pairs (``resolved``) **and** ``p ≤ alpha_look``;
  ``null`` when, with at least that many pairs, both CI ends are bounded and lie within
  ``[1/(1+margin), 1+margin]`` (an effect, if any, smaller than the margin); else ``open``.
- **Why the test as well as the CI**: with 6–10 pairs the percentile bootstrap CI of a median is
  too narrow (it excluded 1 for 18 % of null conditions in the simulation at 6 pairs and three
  looks), so the error rate is set by the exact test, and the CI only has to agree.
  ``alpha_look = alpha / looks`` (:func:`alpha_per_look`; ``looks`` = the rounds a condition can
  have): Bonferroni over the looks, so a null condition is called an effect at any round with
  probability at most ``alpha``. The exact p-value is at least ``2 · 2^-n``, so the first round
  needs ``start`` with ``2 · 2^-start ≤ alpha_look`` (7 seeds for 3 looks at 0.05).
- **Rounds** (:func:`next_seeds`): every condition starts with ``start`` seeds; after each
  round an ``open`` condition gets ``add`` more seeds (its reference pairs come with them: the
  reference runs every seed any condition has), up to ``max_seeds``; a condition at the cap
  stays ``open`` and is reported as "seed cap reached". Conditions resolved either way get no
  more seeds. The rule is the same for every condition and depends only on its own pairs.
- **Family-wise** (:func:`holm`): each condition's exact two-sided Wilcoxon signed-rank p-value
  of its per-seed log ratios (:func:`signed_rank_p`; a censored pair ranks as the largest
  difference in its direction, a pair where neither crossed is left out), then Holm's
  step-down procedure at ``alpha`` over the screen's conditions: p-values sorted ascending, the
  k-th (from 0) compared with ``alpha / (m − k)``, stopping at the first that fails. Holm
  controls the family-wise error rate under any dependence between the tests (they share the
  reference's runs). An exact signed-rank p-value is at least ``2 · 2^-n``, so with ``m``
  conditions an effect can survive only with ``n ≥ log2(2m / alpha)`` pairs (10 for 16
  conditions at 0.05).
- Looking again after each round raises the per-comparison false-positive rate above the nominal
  level; ``benchmarks/sequential_sim.py`` measures it (false positives per comparison and
  family-wise over a screen, power at a 0.8× effect) and docs/results.md has the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

VERDICTS = ("effect", "null", "open")


def looks(start: int, add: int, max_seeds: int) -> int:
    """How many rounds a condition can have under the rule."""
    return 1 + max(0, math.ceil((max_seeds - start) / add))


def alpha_per_look(alpha: float, start: int, add: int, max_seeds: int) -> float:
    return alpha / looks(start, add, max_seeds)


def verdict(effect: Mapping[str, Any], margin: float, p: float | None = None, alpha_look: float | None = None) -> str:
    """``effect``, ``null`` or ``open`` for a :func:`~optolab.experiments.stats.paired_effect`
    ratio result and its signed-rank ``p`` (module rules; without ``p`` the CI alone decides)."""
    if effect["resolved"] and (p is None or alpha_look is None or p <= alpha_look):
        return "effect"
    lo, hi = effect["ci_low"], effect["ci_high"]
    if effect["n_pairs"] >= effect["min_pairs"] and lo is not None and hi is not None \
            and lo >= 1 / (1 + margin) and hi <= 1 + margin:
        return "null"
    return "open"


def next_seeds(seeds: Sequence[int], state: str, add: int, max_seeds: int) -> list[int]:
    """A condition's seeds for the next round: ``add`` more (the next integers) while ``open``
    and under ``max_seeds``; unchanged otherwise."""
    seeds = list(seeds)
    if state != "open" or len(seeds) >= max_seeds:
        return seeds
    nxt = max(seeds) + 1 if seeds else 0
    return seeds + list(range(nxt, nxt + min(add, max_seeds - len(seeds))))


def _log_effects(per_seed: Mapping[Any, float | None]) -> np.ndarray:
    out = []
    for e in per_seed.values():
        if e is None or (isinstance(e, float) and math.isnan(e)):
            continue
        out.append(math.inf if e == math.inf else -math.inf if e <= 0 else math.log(e))
    return np.array(out, dtype=float)


def signed_rank_p(diffs: Sequence[float]) -> float:
    """Exact two-sided p-value of the Wilcoxon signed-rank test of ``diffs`` against 0 (zeros
    dropped, ties given mid-ranks; ±inf ranks largest). Exact enumeration of the sign flips'
    rank sums by dynamic programming on doubled (integer) mid-ranks."""
    d = np.asarray([x for x in diffs if x != 0 and not math.isnan(x)], dtype=float)
    n = len(d)
    if n == 0:
        return 1.0
    a = np.abs(d)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(n)
    i = 0
    while i < n:  # mid-ranks over ties (infinite values tie with each other)
        j = i
        while j + 1 < n and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r2 = np.rint(2 * ranks).astype(int)
    w = int(r2[d > 0].sum())
    counts = np.zeros(int(r2.sum()) + 1)
    counts[0] = 1.0
    for r in r2:
        counts[r:] = counts[r:] + counts[:-r]  # the right side is built before it is assigned
    counts /= counts.sum()
    cdf_low = counts[: w + 1].sum()
    cdf_high = counts[w:].sum()
    return float(min(1.0, 2 * min(cdf_low, cdf_high)))


def condition_p(per_seed: Mapping[Any, float | None]) -> float:
    """The signed-rank p-value of a condition's per-seed ratios (log scale; module rules)."""
    return signed_rank_p(_log_effects(per_seed))


def holm(pvalues: Mapping[str, float], alpha: float = 0.05) -> dict[str, bool]:
    """Holm's step-down procedure: ``{name: survives}`` (module rules)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m = len(order)
    out = {k: False for k in order}
    for k, name in enumerate(order):
        if pvalues[name] > alpha / (m - k):
            break
        out[name] = True
    return out
