"""Statistics over seeds (optolab.experiments.stats) on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optolab.experiments.stats import (
    Crossing,
    crossing_time,
    ecdf,
    effects_table,
    median,
    min_pairs,
    paired_effect,
    survival,
    unpaired_effect,
)

pytestmark = pytest.mark.numerics  # re-run under other CPU kernels (tests/kernel_choices.py)

# --- crossing times ---------------------------------------------------------------------------

XS = [0, 1000, 2000, 3000, 4000]
CURVE = [2.0, 1.5, 0.9, 0.3, 0.1]  # piecewise linear: 0.5 is crossed between 2000 (0.9) and 3000 (0.3)


def test_interpolated_crossing_is_exact_on_a_piecewise_linear_curve():
    # 0.9 -> 0.3 over 1000: 0.5 is 0.4/0.6 of the way
    c = crossing_time(XS, CURVE, 0.5)
    assert c == Crossing(pytest.approx(2000 + 1000 * 0.4 / 0.6), None, False)
    assert c.crossed


def test_without_interpolation_the_first_eval_at_or_below_is_the_time():
    assert crossing_time(XS, CURVE, 0.5, interpolate=False).time == 3000
    assert crossing_time(XS, CURVE, 0.3, interpolate=False).time == 3000  # at the threshold counts
    assert crossing_time(XS, CURVE, 0.3).time == 3000  # and interpolation lands on that eval


def test_a_curve_that_never_crosses_is_censored_at_its_last_eval():
    c = crossing_time(XS, CURVE, 0.05)
    assert c.time is None and c.censored_at == 4000 and not c.left and not c.crossed


def test_a_curve_below_at_its_first_eval_is_left_censored():
    c = crossing_time(XS, CURVE, 2.5)
    assert c.time == 0 and c.left and c.censored_at is None


def test_nan_evals_are_skipped_and_bridged():
    values = [2.0, math.nan, 1.0, math.nan, 0.0]  # the valid evals: 2.0 at 0, 1.0 at 2000, 0.0 at 4000
    assert crossing_time(XS, values, 0.5).time == pytest.approx(3000)
    assert crossing_time(XS, values, 0.5, interpolate=False).time == 4000
    assert crossing_time(XS, [1.0, 0.9, math.nan, math.nan, math.nan], 0.5).censored_at == 1000
    assert crossing_time(XS, [math.nan] * 5, 0.5) == Crossing(None, None, False)


def test_a_rising_curve_crosses_upwards():
    c = crossing_time(XS, [-v for v in CURVE], -0.5, direction="up")
    assert c.time == pytest.approx(2000 + 1000 * 0.4 / 0.6)


# --- median -----------------------------------------------------------------------------------


def test_ordinary_median_of_odd_and_even_counts():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5  # not the lower median (2.0)
    assert median([1.0, 2.0]) == 1.5  # with two seeds, not the minimum
    assert median([]) is None


def test_median_ranks_never_above_every_time():
    assert median([1.0, None, 2.0]) == 2.0
    assert median([1.0, None, math.nan]) is None  # lands on never
    assert median([1.0, 2.0, None, 3.0]) == 2.5
    assert median([1.0, None]) is None  # the mean of a time and "never" is "never"
    assert median([1.0, 2.0, math.inf, None]) is None


# --- paired effects -------------------------------------------------------------------------------


def known_effect(n_seeds: int, factor: float = 0.5, rng_seed: int = 1) -> tuple[dict, dict]:
    """Reference times spread widely over seeds; the condition is ``factor`` × the same seed's
    reference time with 5 % noise: a known paired ratio."""
    rng = np.random.default_rng(rng_seed)
    ref = {s: float(rng.lognormal(math.log(1e5), 0.5)) for s in range(n_seeds)}
    cond = {s: factor * ref[s] * float(np.exp(rng.normal(0, 0.05))) for s in range(n_seeds)}
    return cond, ref


def test_a_known_paired_ratio_is_found_and_resolved():
    cond, ref = known_effect(20)
    r = paired_effect(cond, ref)
    assert r["n_pairs"] == 20 and r["unpaired"] == [] and r["warning"] is None
    assert r["effect"] == pytest.approx(0.5, abs=0.03)
    assert r["ci_low"] < 0.5 < r["ci_high"] < 1
    assert r["resolved"]


def test_pairing_narrows_the_ci_against_an_unpaired_bootstrap_of_the_same_data():
    cond, ref = known_effect(20)
    paired = paired_effect(cond, ref)
    unpaired = unpaired_effect(list(cond.values()), list(ref.values()))
    # seed-to-seed spread (sigma 0.5 in log) dwarfs the within-seed noise (0.05): pairing removes it
    assert (paired["ci_high"] - paired["ci_low"]) * 4 < unpaired["ci_high"] - unpaired["ci_low"]


def test_a_known_difference_is_found():
    cond, ref = known_effect(20, factor=1.0)
    shifted = {s: t + 20_000 for s, t in ref.items()}
    r = paired_effect(shifted, ref, kind="difference")
    assert r["effect"] == pytest.approx(20_000) and r["ci_low"] == r["ci_high"] == pytest.approx(20_000)
    assert r["resolved"]
    r = paired_effect(cond, ref, kind="difference")  # no effect but noise
    assert r["ci_low"] < 0 < r["ci_high"] and not r["resolved"]


def test_with_two_seeds_the_ci_cannot_resolve_and_says_so():
    cond, ref = known_effect(2)
    r = paired_effect(cond, ref)
    assert r["n_pairs"] == 2 and not r["resolved"]
    assert r["warning"] is not None and "2 paired seed" in r["warning"]
    # the "CI" of two pairs is the range of their two ratios, nothing more
    ratios = sorted(cond[s] / ref[s] for s in ref)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(ratios))
    assert r["ci_high"] < 1  # it excludes 1, and still does not count as resolved


def test_min_pairs_is_where_the_percentile_ci_stops_being_the_range():
    assert min_pairs(0.95) == 6 and min_pairs(0.99) == 8
    for n in range(2, 9):
        effects = {s: 0.5 + 0.01 * s for s in range(n)}  # all below 1, distinct
        r = paired_effect(effects, {s: 1.0 for s in range(n)}, n_boot=20_000)
        is_range = (r["ci_low"], r["ci_high"]) == pytest.approx((0.5, 0.5 + 0.01 * (n - 1)))
        assert is_range == (n < min_pairs()), n
        assert r["resolved"] == (n >= min_pairs()), n
        assert (r["warning"] is not None) == (n < min_pairs()), n


def test_pairs_are_by_seed_and_unpaired_seeds_are_named():
    r = paired_effect({0: 1.0, 1: 2.0, 10: 3.0}, {1: 4.0, 0: 2.0, 7: 1.0})
    assert r["per_seed"] == {0: 0.5, 1: 0.5}
    assert r["n_pairs"] == 2 and r["unpaired"] == [7, 10]
    assert "only one condition" in r["warning"]


def test_censored_seeds_are_counted_not_dropped():
    # 7 seeds: the condition halves the time in 4, never crosses in 3 (the reference does)
    ref = {s: 100.0 + s for s in range(7)}
    cond = {s: ref[s] / 2 if s < 4 else None for s in range(7)}
    r = paired_effect(cond, ref)
    assert [r["per_seed"][s] for s in range(4, 7)] == [math.inf] * 3
    assert r["n_pairs"] == 7 and r["n_censored"] == 3
    assert r["effect"] == 0.5  # the 4th of 7 sorted effects: 0.5 0.5 0.5 0.5 inf inf inf
    assert r["ci_low"] == 0.5 and r["ci_high"] is None  # resamples with 4+ censored seeds: unbounded
    assert not r["resolved"]
    # a majority of censored seeds puts the median itself on "never"
    r = paired_effect({s: None if s else 50.0 for s in range(7)}, ref)
    assert r["effect"] is None and r["effect_low"] > 1 and "condition never crossed in 6" in r["warning"]


def test_a_reference_that_never_crosses_gives_zero_ratio_and_minus_inf_difference():
    r = paired_effect({0: 10.0, 1: 20.0}, {0: None, 1: 40.0})
    assert r["per_seed"] == {0: 0.0, 1: 0.5} and r["n_censored"] == 1
    d = paired_effect({0: 10.0, 1: 20.0}, {0: None, 1: 40.0}, kind="difference")
    assert d["per_seed"] == {0: -math.inf, 1: -20.0}
    assert d["effect"] is None and d["ci_low"] is None and d["ci_high"] == -20.0


def test_a_reference_seed_that_never_crossed_bounds_the_ratio_instead_of_halving_it():
    """c9baccf's report: one `none` seed without the event turned a later condition into "ratio
    0.635 [0, 1.27]" (the median of 1.27 and a censored 0), which reads as a speed-up."""
    # seed 0: the condition is later (1.27x); seed 1: the reference never crossed by 2e5
    r = paired_effect({0: 127.0, 1: 190.0}, {0: 100.0, 1: None}, ref_censored_at={1: 200.0})
    assert r["per_seed_bounds"] == {0: (1.27, 1.27), 1: (0.0, 0.95)}
    assert r["effect"] is None  # cannot say: the middle of two seeds depends on the censored one
    assert (r["effect_low"], r["effect_high"]) == pytest.approx((0.635, 1.11))
    assert r["censored"] == {"condition": 0, "reference": 1}
    assert "cannot say" in r["warning"] and "reference never crossed in 1 seed" in r["warning"]
    assert r["ci_low"] == 0.0 and r["ci_high"] == 1.27 and not r["resolved"]
    # with 7 seeds and one censored reference the median is still a number: it is said
    cond = {s: 130.0 + s for s in range(7)}
    ref = {s: 100.0 for s in range(6)} | {6: None}
    r = paired_effect(cond, ref, ref_censored_at={6: 200.0})
    assert r["effect"] == pytest.approx(1.32) and r["effect_low"] == r["effect_high"] == r["effect"]
    assert r["resolved"] and r["ci_low"] > 1
    # the censoring point decides the bound: a reference run that stopped at 100 says less
    r = paired_effect({0: 150.0}, {0: None}, ref_censored_at={0: 100.0})
    assert r["per_seed_bounds"] == {0: (0.0, 1.5)}


def test_pairs_where_neither_crosses_are_excluded_and_counted():
    ref = {s: 100.0 for s in range(8)}
    ref.update({6: None, 7: None})
    cond = {s: 50.0 for s in range(8)}
    cond.update({6: None, 7: math.nan})  # NaN (from a DataFrame) is "never" too
    r = paired_effect(cond, ref)
    assert r["n_pairs"] == 6 and r["n_undefined"] == 2
    assert r["per_seed"][6] is None and r["per_seed"][7] is None
    assert r["effect"] == 0.5 and r["resolved"]
    assert "neither condition crossed" in r["warning"]
    r = paired_effect({0: None}, {0: None})
    assert r["n_pairs"] == 0 and r["effect"] is None and not r["resolved"] and "nothing" in r["warning"]


def test_undefined_resample_medians_widen_the_difference_ci():
    # +inf and -inf per-seed differences: a resample whose middle pair is both has no median
    r = paired_effect({0: None, 1: 1.0, 2: None, 3: 1.0}, {0: 1.0, 1: None, 2: 1.0, 3: None},
                      kind="difference")
    assert sorted(r["per_seed"].values()) == [-math.inf, -math.inf, math.inf, math.inf]
    assert r["effect"] is None and r["ci_low"] is None and r["ci_high"] is None


def test_same_seed_same_ci_and_another_seed_another():
    cond, ref = known_effect(9, rng_seed=3)
    a = paired_effect(cond, ref, seed=7)
    b = paired_effect(cond, ref, seed=7)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    c = paired_effect(cond, ref, seed=8, n_boot=200)
    assert (c["ci_low"], c["ci_high"]) != (a["ci_low"], a["ci_high"])
    u = [unpaired_effect(list(cond.values()), list(ref.values()), seed=7) for _ in range(2)]
    assert u[0] == u[1]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        paired_effect({0: 1.0}, {0: 1.0}, kind="log")
    with pytest.raises(ValueError, match="level"):
        paired_effect({0: 1.0}, {0: 1.0}, level=95)
    with pytest.raises(ValueError, match="direction"):
        crossing_time(XS, CURVE, 0.5, direction="sideways")


# --- survival -----------------------------------------------------------------------------------


def test_kaplan_meier_matches_a_hand_computed_example():
    # 6 runs: crossings at 1, 2, 2, 3; never crossed, last evals at 1.5 and 3
    times = [1.0, None, 2.0, 2.0, None, 3.0]
    last = [None, 1.5, None, None, 3.0, None]
    # t=1: 6 at risk, 1 crosses -> 5/6; 1.5: one censored (4 left); t=2: 4 at risk, 2 cross -> 5/6·2/4;
    # t=3: 2 at risk (the censored-at-3 run was still at risk), 1 crosses -> 5/12·1/2
    expected = [(1.0, 5 / 6), (1.5, 5 / 6), (2.0, 5 / 12), (3.0, 5 / 24)]
    got = survival(times, last)
    assert [x for x, _ in got] == [x for x, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected])
    assert [f for _, f in ecdf(times, last)] == pytest.approx([1 - s for _, s in expected])


def test_never_crossing_runs_keep_the_curve_up_rather_than_vanishing():
    # dropping the two never-crossing runs would give survival 0 after t=2
    got = survival([1.0, 2.0, None, None])
    assert got == [(1.0, 0.75), (2.0, 0.5)]
    assert survival([None, None], [5.0, 6.0]) == [(5.0, 1.0), (6.0, 1.0)]
    with pytest.raises(ValueError, match="censored_at"):
        survival([1.0], [None, None])


# --- the report's helper ------------------------------------------------------------------------------


def test_effects_table_pairs_each_condition_with_the_reference_at_its_grid_point():
    cond, ref = known_effect(8)
    runs = []
    for lr in ("1e-3", "3e-3"):
        for s in range(8):
            runs.append({"condition": "base", "group": f"base__lr-{lr}", "seed": s, "t": ref[s]})
            runs.append({"condition": "clamp", "group": f"clamp__lr-{lr}", "seed": s,
                         "t": cond[s] if lr == "1e-3" else (None if s == 0 else ref[s] * 2)})
    rows = effects_table(runs, "base", "t")
    assert [(r["condition"], r["point"]) for r in rows] == [
        ("base", "__lr-1e-3"), ("clamp", "__lr-1e-3"), ("base", "__lr-3e-3"), ("clamp", "__lr-3e-3")]
    base, halved, _, doubled = rows
    assert "ratio" not in base and base["median"] == median(list(ref.values()))
    assert halved["n_pairs"] == 8 and halved["ratio"] == pytest.approx(0.5, abs=0.03) and halved["ratio_resolved"]
    assert halved["difference"] < 0 and halved["difference_resolved"] and halved["warning"] is None
    assert doubled["n_crossed"] == 7 and doubled["n_censored"] == 1
    # one censored seed of 8 sits at the median of a resample only when drawn 4+ times (1 %): bounded CI
    assert doubled["ratio"] == doubled["ratio_ci_low"] == doubled["ratio_ci_high"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="twice"):
        effects_table(runs + [runs[0]], "base", "t")
