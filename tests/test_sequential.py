"""Sequential seeds, Holm and the signed-rank test (optolab.experiments.sequential), and the
critical-window bisection (optolab.experiments.window_search) on known responses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from optolab.experiments import sequential, window_search
from optolab.experiments.stats import paired_effect


def _brute_p(diffs):
    d = [x for x in diffs if x != 0]
    a = np.abs(d)
    ranks = np.argsort(np.argsort(a)) + 1.0  # no ties in these inputs
    w = ranks[np.array(d) > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    lo = np.mean([s <= w for s in sums])
    hi = np.mean([s >= w for s in sums])
    return min(1.0, 2 * min(lo, hi))


@pytest.mark.parametrize("diffs", [[1, 2, 3, 4, 5, 6], [1, 2, 3, -4, 5, 6], [-0.3, 0.1, 0.25, -0.05, 0.7],
                                   [0.5, -1.5, 2.5, -3.5, 4.5, 5.5, -6.5, 7.5]])
def test_signed_rank_matches_enumeration(diffs):
    assert sequential.signed_rank_p(diffs) == pytest.approx(_brute_p(diffs), abs=1e-12)


def test_signed_rank_floor_and_censored_pairs():
    assert sequential.signed_rank_p([1] * 6) == pytest.approx(2 / 64)
    # a censored pair (never crossed) ranks as the largest difference in its direction
    assert sequential.condition_p({0: 1.2, 1: 1.3, 2: math.inf, 3: 1.1, 4: 1.4, 5: 1.25}) == pytest.approx(2 / 64)


def test_holm_step_down():
    got = sequential.holm({"a": 0.001, "b": 0.012, "c": 0.03, "d": 0.04}, alpha=0.05)
    # 0.001 <= .05/4, 0.012 <= .05/3, 0.03 > .05/2: stop there (d, though under .05, fails with it)
    assert got == {"a": True, "b": True, "c": False, "d": False}


def _pairs(ratio, sigma, seeds, rng):
    ref = {s: float(1000 * np.exp(rng.normal(0, 0.3))) for s in seeds}
    cond = {s: ref[s] * ratio * float(np.exp(rng.normal(0, sigma))) for s in seeds}
    return cond, ref


def test_rounds_resolve_a_known_effect_a_null_and_stop_at_the_cap():
    """A 1.5x delay resolves in the first round, a null within a 10 % margin is called null,
    and a noisy small effect gets seeds up to the cap and stays open."""
    rng = np.random.default_rng(0)
    cases = {"effect": (1.5, 0.05), "null": (1.0, 0.01), "noisy": (1.05, 0.4)}
    got = {}
    for name, (ratio, sigma) in cases.items():
        seeds = list(range(6))
        while True:
            cond, ref = _pairs(ratio, sigma, seeds, np.random.default_rng(len(seeds) + 100 * list(cases).index(name)))
            v = sequential.verdict(paired_effect(cond, ref, n_boot=500), margin=0.1)
            grown = sequential.next_seeds(seeds, v, add=2, max_seeds=10)
            if grown == seeds:
                break
            seeds = grown
        got[name] = (v, len(seeds))
    del rng
    assert got["effect"] == ("effect", 6)
    assert got["null"] == ("null", 6)
    assert got["noisy"] == ("open", 10)


def test_next_seeds_rule():
    assert sequential.next_seeds([0, 1], "open", 3, 4) == [0, 1, 2, 3]
    assert sequential.next_seeds([0, 1], "effect", 3, 10) == [0, 1]
    assert sequential.next_seeds([5, 6, 7], "open", 2, 3) == [5, 6, 7]


def _response(lo, hi, size):
    """A clamp that delays the crossing by ``size`` × the covered fraction of [lo, hi] (T units)."""
    def ratio(a, b):
        cover = max(0.0, min(b, hi) - max(a, lo)) / (hi - lo)
        return 1 + size * cover
    return ratio


@pytest.mark.parametrize("lo,hi,resolution", [(0.4, 0.7, 0.05), (0.1, 1.2, 0.1), (0.0, 0.3, 0.02)])
def test_bisection_finds_a_known_critical_window(lo, hi, resolution):
    size, effect = 0.5, 0.1
    f = _response(lo, hi, size)
    calls = []

    def probe(asks):
        calls.append(asks)
        return {k: f(a, b) for k, (a, b) in asks.items()}

    got = window_search.search(probe, "delay", effect, 3.0, resolution)
    need = effect / size * (hi - lo)  # the overlap that still moves the time by `effect`
    true_start, true_stop = hi - need, lo + need
    a, b = got["latest_start"], got["earliest_stop"]
    assert a["bracket"][0] <= true_start <= a["bracket"][1] and a["bracket"][1] - a["bracket"][0] <= resolution
    assert b["bracket"][0] <= true_stop <= b["bracket"][1] and b["bracket"][1] - b["bracket"][0] <= resolution
    assert abs(a["value"] - true_start) <= resolution and abs(b["value"] - true_stop) <= resolution
    assert len(calls) <= math.ceil(math.log2(3.0 / resolution)) + 1  # bisection, not a grid


def test_known_ends_narrow_the_brackets_and_keep_the_answer():
    """A window starting after every reference crossing, or stopping after every whole-clamp
    crossing, is known without a probe (window_search rules): fewer rounds, the same answer."""
    f = _response(0.4, 0.7, 0.5)  # nothing after 0.7 T matters

    def run(**known):
        calls = []

        def probe(asks):
            calls.append(asks)
            return {k: f(a, b) for k, (a, b) in asks.items()}

        return window_search.search(probe, "delay", 0.1, 3.0, 0.05, **known), len(calls)

    full, n_full = run()
    narrow, n_narrow = run(start_fails=0.75, stop_holds=0.75)
    assert n_narrow < n_full
    for which, true in (("latest_start", 0.64), ("earliest_stop", 0.46)):
        lo, hi = narrow[which]["bracket"]
        assert lo <= true <= hi and hi - lo <= 0.05
        assert abs(narrow[which]["value"] - full[which]["value"]) <= 0.05
    assert run(start_fails=5.0, stop_holds=5.0)[0] == full  # a known end past hi is hi


def test_bisection_speedup_direction():
    got = window_search.search(lambda asks: {k: 1 / _response(0.2, 0.5, 1.0)(a, b) for k, (a, b) in asks.items()},
                               "speedup", 0.2, 2.0, 0.05)
    # 1 / (1 + cover) <= 1 / 1.2  <=>  cover >= 0.2  <=>  overlap >= 0.06 T
    assert abs(got["latest_start"]["value"] - 0.44) <= 0.05 and abs(got["earliest_stop"]["value"] - 0.26) <= 0.05


def test_the_exact_test_gates_an_effect_verdict():
    """A CI that excludes 1 is an effect only when the signed-rank p is within alpha per look:
    6 pairs all one way give p = 1/32, above 0.05 / 3 looks."""
    cond = {s: 1.2 + 0.01 * s for s in range(6)}
    e = paired_effect(cond, {s: 1.0 for s in range(6)}, n_boot=500)
    p = sequential.condition_p(e["per_seed"])
    assert e["resolved"] and p == pytest.approx(1 / 32)
    assert sequential.verdict(e, 0.1, p, sequential.alpha_per_look(0.05, 6, 2, 10)) == "open"
    assert sequential.looks(6, 2, 10) == 3 and sequential.looks(7, 2, 11) == 3 and sequential.looks(6, 2, 6) == 1
    assert sequential.verdict(e, 0.1, p, sequential.alpha_per_look(0.05, 6, 2, 6)) == "effect"
