"""Phase-change detection on synthetic curves with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from optolab.measures.phase import detect, ratio, summarize_times

pytestmark = pytest.mark.numerics  # re-run under other CPU kernels (tests/kernel_choices.py)


def sigmoid_drop(x, at, width, high, low):
    return low + (high - low) / (1 + np.exp((x - at) / width))


def noisy(y, sigma, seed):
    return y + np.random.default_rng(seed).normal(0, sigma, len(y))


X = np.arange(0, 300_001, 5000, dtype=float)  # an eval every 5,000 sequences


@pytest.mark.parametrize("at", [60_000, 150_000, 240_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_noisy_sigmoid_drop_is_found_at_its_known_time(at, seed):
    # initial fall to a plateau near ln 2, then the phase change at `at`
    y = sigmoid_drop(X, 8000, 3000, 1.6, 0.72) - 0.72 + sigmoid_drop(X, at, 8000, 0.72, 0.05)
    pc = detect(X, noisy(y, 0.02, seed))
    assert pc.found
    assert abs(pc.event.midpoint - at) <= 10_000  # within two eval intervals
    assert pc.event.onset < pc.event.midpoint < pc.event.end
    assert abs(pc.event.plateau - 0.72) < 0.05
    assert abs(pc.event.end_level - 0.05) < 0.08


def test_no_drop_is_reported_as_no_phase_change():
    y = noisy(np.full(len(X), 0.72), 0.03, 0)
    pc = detect(X, y)
    assert not pc.found and pc.events == ()


def test_a_slow_linear_creep_is_not_a_phase_change_when_small():
    y = noisy(0.72 - 0.02 * X / X.max(), 0.02, 1)
    assert not detect(X, y).found


def test_two_drops_are_both_found_and_the_larger_is_the_phase_change():
    y = 2.0 - 0.4 / (1 + np.exp(-(X - 80_000) / 6000)) - 1.2 / (1 + np.exp(-(X - 200_000) / 6000))
    pc = detect(X, noisy(y, 0.01, 3))
    mids = sorted(e.midpoint for e in pc.events)
    assert len(mids) == 2
    assert abs(mids[0] - 80_000) <= 10_000 and abs(mids[1] - 200_000) <= 10_000
    assert abs(pc.event.midpoint - 200_000) <= 10_000
    assert abs(pc.event.plateau - 1.6) < 0.05  # the level between the two drops


def test_a_drop_at_the_very_start_is_listed_and_counts_only_when_asked():
    y = noisy(sigmoid_drop(X, 5000, 4000, 1.6, 0.1), 0.01, 4)
    pc = detect(X, y)
    assert not pc.found  # no plateau before it: the fall from initialisation
    assert len(pc.events) == 1 and pc.events[0].midpoint <= 15_000 and not pc.events[0].after_plateau
    pc = detect(X, y, require_plateau=False)
    assert pc.found and pc.event.midpoint <= 15_000


def test_a_drop_at_the_very_end_is_found():
    y = sigmoid_drop(X, 285_000, 5000, 0.72, 0.1)
    pc = detect(X, noisy(y, 0.01, 5))
    assert pc.found and abs(pc.event.midpoint - 285_000) <= 10_000


def test_rising_measures_use_direction_up():
    y = noisy(0.05 + 0.8 / (1 + np.exp(-(X - 120_000) / 8000)), 0.02, 6)
    pc = detect(X, y, direction="up")
    assert pc.found and abs(pc.event.midpoint - 120_000) <= 10_000
    assert pc.event.end_level > pc.event.start_level


def test_seed_summary_and_ratio_with_bootstrap_intervals():
    s = summarize_times([100, 110, 120, 130, 140])
    assert s["median"] == 120 and s["ci_low"] <= 120 <= s["ci_high"] and s["n_found"] == 5
    never = summarize_times([100, None, None])
    assert never["median"] is None and never["n_found"] == 1
    r = ratio([50, 55, 60], [100, 110, 120])
    assert r["ratio"] == pytest.approx(55 / 110) and r["ci_low"] <= r["ratio"] <= r["ci_high"]
    assert ratio([50, None, None], [100, 110, 120])["ratio"] is None


def test_a_slow_large_creep_is_an_event_but_not_a_phase_change():
    y = noisy(1.0 - 0.5 * X / X.max(), 0.005, 7)  # falls 0.5 steadily over the whole run
    pc = detect(X, y)
    assert pc.events and not any(e.abrupt for e in pc.events)
    assert not pc.found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_large_first_fall_from_initialisation_does_not_hide_the_later_phase_change(seed):
    # the shape of a 15-label run: ln 15 -> 0.9 quickly, a slow creep to 0.75, then the drop at
    # 1e6; the first fall is the larger one but follows no plateau
    x = np.arange(0, 1_600_001, 5000, dtype=float)
    y = (0.9 + 2.1 * np.exp(-x / 20_000) - 0.15 * x / 800_000 * (x < 800_000)
         - 0.15 * (x >= 800_000) - 0.73 / (1 + np.exp(-(x - 1_000_000) / 60_000)))
    pc = detect(x, noisy(y, 0.01, seed))
    assert pc.found and len(pc.events) == 2
    assert not pc.events[0].after_plateau
    assert abs(pc.event.midpoint - 1_000_000) <= 40_000
    assert 0.72 < pc.event.plateau < 0.9 and 700_000 < pc.event.onset < pc.event.midpoint


def test_a_short_plateau_after_a_slow_first_fall_counts():
    # the layer-1 clamp's shape: a gentle fall to a short plateau near ln 5, then a steep drop
    y = 1.95 - 0.3 * np.minimum(X, 15_000) / 15_000 - 1.6 / (1 + np.exp(-(X - 55_000) / 6000))
    pc = detect(X, noisy(y, 0.01, 5))
    assert pc.found and abs(pc.event.midpoint - 55_000) <= 10_000 and 1.5 < pc.event.plateau < 1.8


def test_stages_from_several_signals_find_a_flat_loss_stage_where_a_score_rises():
    """Loss: a first fall, a plateau, the drop. The previous-token score rises during the plateau,
    the induction score with the drop: the plateau splits into flat / structure forms / flat."""
    import numpy as np

    from optolab.measures.stages import Signal, stages

    rng = np.random.default_rng(0)
    xs = np.arange(0, 1001, 10, dtype=float)

    def ramp(a, b, lo, hi):
        return lo + (hi - lo) * np.clip((xs - a) / (b - a), 0, 1)

    loss = ramp(100, 200, 1.6, 0.7) + ramp(600, 700, 0, -0.65) + rng.normal(0, 0.003, len(xs))
    prev = ramp(350, 450, 0.1, 0.8) + rng.normal(0, 0.003, len(xs))
    ind = ramp(600, 700, 0.0, 0.9) + rng.normal(0, 0.003, len(xs))
    got = stages({"loss": Signal(xs, loss, "down"), "prev_token": Signal(xs, prev, "up"),
                  "induction": Signal(xs, ind, "up")})
    kinds = [(round(s["start"], -1), round(s["end"], -1), s["kind"]) for s in got]
    assert [k for *_, k in kinds] == ["loss flat", "loss falls", "loss flat", "loss flat while structure forms",
                                      "loss flat", "loss falls", "loss flat"]
    edges = [s["start"] for s in got[1:]]
    assert np.allclose(edges, [110, 190, 360, 440, 610, 690], atol=25)
    drop = got[5]
    assert any(n.startswith("induction") for n in drop["boundary_signals"]) and "induction" in drop["moved"]
    assert "prev_token" in got[3]["moved"] and "loss" not in got[3]["moved"]


def test_stages_inside_the_loss_drop_are_falling_and_same_kinds_merge():
    """The main run at seed 5 (issue 30): events of other signals split the loss's own drop, and
    the spans between them (the drop's tail, 0.20 → 0.08) were labelled ``loss flat``: under 10 %
    of the run's total fall from 1.6, although the loss falls by 60 % there. Every stage inside
    the detector's drop must read ``loss falls``, and no two adjacent stages read alike."""
    import numpy as np

    from optolab.measures.phase import detect
    from optolab.measures.stages import Signal, stages

    rng = np.random.default_rng(0)
    xs = np.arange(0, 1_000_001, 5000, dtype=float)

    def ramp(a, b, lo, hi):
        return lo + (hi - lo) * np.clip((xs - a) / (b - a), 0, 1)

    # the main run's shape: a first fall, a creeping plateau, the drop to 0.01 around 2.15e5
    first, plateau = 0.85 * np.exp(-xs / 15_000), 0.78 - 0.08 * np.clip((xs - 40_000) / 140_000, 0, 1)
    drop = 1 / (1 + np.exp(-(xs - 215_000) / 30_000))
    loss = (first + plateau) * (1 - drop) + (0.07 * np.exp(-(xs - 260_000).clip(0) / 150_000) + 0.01) * drop
    loss = loss * np.exp(rng.normal(0, 0.01, len(xs)))
    signals = {"loss": Signal(xs, loss, "down"),
               "prev_token L0": Signal(xs, ramp(10_000, 45_000, 0.1, 0.6) + ramp(60_000, 150_000, 0, 0.2)
                                       + rng.normal(0, 0.005, len(xs)), "up"),
               "induction L1": Signal(xs, ramp(150_000, 200_000, 0.0, 0.8) + rng.normal(0, 0.005, len(xs)), "up"),
               "trajectory speed": Signal(xs, ramp(250_000, 330_000, 0, 1.0) + rng.normal(0, 0.02, len(xs)), "up")}
    ev = detect(xs, loss).event
    got = stages(signals)
    inside = [s for s in got if min(s["end"], ev.end) - max(s["start"], ev.onset) >= 0.5 * (s["end"] - s["start"])]
    assert inside and all(s["kind"] == "loss falls" for s in inside), [(s["start"], s["end"], s["kind"]) for s in got]
    assert all(a["kind"] != b["kind"] for a, b in zip(got, got[1:]))
    assert [s["kind"] for s in got][:3] == ["loss falls", "loss flat while structure forms", "loss falls"]
    drop_stage = got[2]
    assert abs(drop_stage["end"] - ev.end) <= 10_000 and "trajectory speed onset" in str(drop_stage["inner_boundaries"])
    assert "prev_token L0" in got[1]["moved"] and "loss" not in got[1]["moved"]
