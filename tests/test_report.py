"""The sweep report on synthetic run directories with a known effect: paired ratios with CIs,
interpolated crossing times, censored seeds, the opening sentences, figures, a sweep still
running (missing runs listed), and the sweep's progress lines."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from optolab.experiments.executors import Progress
from optolab.experiments.report import write_report

SEEDS = list(range(8))


def _readout(clamps: list) -> dict:
    windowed = [c for c in clamps if c.get("window") and c.get("apply_at", "both") != "train"]
    return {"model": "clamped inside windows" if windowed else "unclamped", "clamps": []}


def _run(out, rid: str, crossing: float | None, seed: int, clamps: list) -> None:
    """A run whose main loss falls linearly from 1.5 and crosses 0.5 at ``crossing`` sequences
    (None: never; it stops at 0.6), evaluated every 100 sequences up to 4,000."""
    d = out / rid
    d.mkdir(parents=True)
    xs = np.arange(0, 4001, 100)
    loss = np.full(len(xs), 0.6) if crossing is None else np.maximum(1.5 - xs / crossing, 0.01)
    rows = [{"step": int(x // 10), "sequences": int(x), "split": "val", "metric": "loss", "layer": None,
             "head": None, "src_layer": None, "src_head": None, "value": float(v)} for x, v in zip(xs, loss)]
    pd.DataFrame(rows).to_parquet(d / "metrics.parquet")
    first = next((int(x) for x, v in zip(xs, loss) if v < 0.5), None)
    (d / "summary.json").write_text(json.dumps({
        "main_split": "val", "status": "finished", "readout": _readout(clamps),
        "time_to_loss_0.5": None if first is None else {"step": first // 10, "sequences": first},
        "final": {"val": {"loss": float(loss[-1]), "acc": 0.9}}}))
    (d / "protocol.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 10}, "clamps": clamps}))


def _sweep(tmp_path, missing: str | None = None):
    out = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    window = {"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [2], "to": "previous_token",
              "window": {"start": 50, "stop": 150, "unit": "steps"}}
    runs = {}
    for s in SEEDS:
        base = 1000 * float(np.exp(rng.normal(0, 0.3)))  # seeds differ a lot; the effect is the same
        for cond, t, clamps in (("none", base, []), ("fast", 0.5 * base * float(np.exp(rng.normal(0, 0.02))),
                                                     [window]),
                                ("never", None if s < 2 else 2.0 * base, [])):
            rid = f"{cond}_s{s}"
            runs[rid] = {"condition": cond, "point": {}, "seed": s, "group": cond}
            if rid != missing:
                _run(out, rid, t, s, clamps)
    (out / "sweep.json").write_text(json.dumps({
        "sweep": {"name": "known", "reference": "none",
                  "conditions": [{"name": "none"}, {"name": "fast"}, {"name": "never", "set": {"train.lr": 0.001}}]},
        "runs": runs}))
    return out


def test_the_report_finds_a_known_paired_effect_and_opens_with_it(tmp_path):
    out = _sweep(tmp_path)
    write_report(out)
    cond = pd.read_csv(out / "conditions.csv").set_index("group")
    fast = cond.loc["fast"]
    assert abs(fast.t05_ratio - 0.5) < 0.03 and fast.t05_ratio_ci_low < 0.5 < fast.t05_ratio_ci_high
    assert fast.t05_ratio_ci_high < 0.6 and bool(fast.t05_resolved) and fast.t05_pairs == len(SEEDS)
    # interpolation: the loss 1.5 - x/t crosses 0.5 at x = t exactly; evals every 100 would round up
    summary = pd.read_csv(out / "summary.csv").set_index("run")
    s0 = summary.loc["none_s0"]
    assert s0.t05 < s0["loss_below_0.5"] and s0["loss_below_0.5"] - s0.t05 < 100
    # censoring: two seeds of 'never' never cross; they count, as later than any time
    never = cond.loc["never"]
    assert never.t05_found == len(SEEDS) - 2 and never.t05_ratio > 1.5 and np.isnan(never.t05_ratio_ci_high)
    text = (out / "report.md").read_text()
    intro = text.split("## Per condition")[0]
    assert "compares 3 conditions over 8 seeds" in intro and "against 'none'" in intro
    assert "**fast**: clamps: set blocks.0.attn.hook_pattern heads [2] to previous_token during [50, 150) steps" in intro
    assert "**never**: train.lr = 0.001, no clamp" in intro
    assert "'fast' speeds up the drop below loss 0.5 by a factor 0.5 (paired over 8 seeds; 95 % CI [0.49" in intro
    assert "'never' delays the drop below loss 0.5 by a factor 2 (paired over 8 seeds; 95 % CI [" in intro
    assert "**Censoring:** 2 of 24 runs never got below loss 0.5" in intro
    # 'fast' reads the clamped model inside its window (apply_at: both): the report says so first
    assert "**Readout warning:** in 1 condition(s) (fast) evals inside a clamp's window read the clamped" in intro
    assert "interpolated" in intro
    for fig in ("loss_curves", "times", "effects", "survival"):
        assert (out / "figures" / f"{fig}.png").is_file()


def test_too_few_seeds_are_a_warning_and_a_running_sweep_lists_what_is_missing(tmp_path):
    out = _sweep(tmp_path, missing="fast_s3")
    for s in SEEDS[2:]:  # leave two seeds of each
        for c in ("none", "fast", "never"):
            rid = f"{c}_s{s}"
            if (out / rid / "summary.json").is_file():
                (out / rid / "summary.json").unlink()  # as if still training
    write_report(out)
    text = (out / "report.md").read_text()
    assert "**Warning:**" in text and "missing: " in text and "fast_s3" in text
    cond = pd.read_csv(out / "conditions.csv").set_index("group")
    assert not bool(cond.loc["fast"].t05_resolved)


def test_sweep_progress_counts_runs_and_estimates_the_time_left():
    stream = io.StringIO()
    p = Progress([[("a", {}), ("b", {})], [("c", {})], [("d", {})]], workers=2, stream=stream)
    p.ended({"a": "done", "b": "done"})
    p.ended({"c": "failed: boom"})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[sweep] 2/4 runs finished, 2 running, 0 failed, about ")
    assert lines[1].startswith("[sweep] 2/4 runs finished, 1 running, 1 failed, about ")


def _design_sweep(tmp_path, design: dict, cells: dict[str, tuple[float, list]]):
    """Runs of ``cells`` (condition -> (factor on the reference's time, clamps)) plus 'none'."""
    out = tmp_path / "sweep"
    rng = np.random.default_rng(1)
    runs = {}
    for s in range(6):
        base = 1000 * float(np.exp(rng.normal(0, 0.3)))
        for cond, (factor, clamps) in {"none": (1.0, []), **cells}.items():
            rid = f"{cond}_s{s}"
            runs[rid] = {"condition": cond, "point": {}, "seed": s, "group": cond}
            _run(out, rid, factor * base * float(np.exp(rng.normal(0, 0.02))), s, clamps)
    (out / "sweep.json").write_text(json.dumps({
        "sweep": {"name": "design", "reference": "none", "design": design, "conditions": []}, "runs": runs}))
    return out


def test_a_screen_report_ranks_targets_by_their_paired_effect(tmp_path):
    cells = {f"{what}_L0H{h}": (f, []) for what, h, f in
             [("ablate", 0, 1.0), ("ablate", 1, 2.5), ("prev_token", 0, 0.6), ("prev_token", 1, 1.0)]}
    out = _design_sweep(tmp_path, {"kind": "screen"}, cells)
    write_report(out)
    text = (out / "report.md").read_text()
    ranked = [line.split(" | ")[1] for line in text.split("## Screen")[1].splitlines() if line.startswith("| 1 ")
              or line.startswith("| 4 ")]
    assert ranked == ["ablate_L0H1", "prev_token_L0H0"]  # most delaying first, most speeding last
    assert (out / "figures" / "screen.png").is_file()


def test_a_window_scan_report_draws_the_effect_by_window_start(tmp_path):
    def clamp(start):
        return [{"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [2], "to": "previous_token",
                 "window": {"start": start, "stop": start + 100, "unit": "sequences"}}]
    cells = {f"win_s{s}_l100": (f, clamp(s)) for s, f in [(0, 0.7), (500, 0.9), (2000, 1.0)]}
    out = _design_sweep(tmp_path, {"kind": "window_scan"}, cells)
    write_report(out)
    table = (out / "report.md").read_text().split("## Window scan")[1]
    starts = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ") and
              line[2].isdigit()]
    assert starts == ["0", "500", "2e+03"] and (out / "figures" / "window_scan.png").is_file()


def test_a_reference_seed_without_the_event_is_censored_not_averaged_into_a_speed_up(tmp_path):
    """c9baccf: one `none` seed that never crossed turned a later condition into "ratio 0.635
    [0, 1.27]" (the median of 1.27 and a censored 0), which read as a speed-up."""
    out = tmp_path / "sweep"
    runs = {}
    for s, (ref, later) in enumerate([(1000.0, 1270.0), (None, 1900.0)]):
        for cond, t in (("none", ref), ("later", later)):
            rid = f"{cond}_s{s}"
            runs[rid] = {"condition": cond, "point": {}, "seed": s, "group": cond}
            _run(out, rid, t, s, [])
    (out / "sweep.json").write_text(json.dumps({
        "sweep": {"name": "censored", "reference": "none", "conditions": [{"name": "none"}, {"name": "later"}]},
        "runs": runs}))
    write_report(out)
    cond = pd.read_csv(out / "conditions.csv").set_index("group").loc["later"]
    assert np.isnan(cond.t05_ratio) and cond.t05_censored_reference == 1
    # the reference's seed 1 is censored at its last eval (4,000): its ratio is at most 1,900 / 4,000
    assert cond.t05_ratio_low == pytest.approx((1.27 + 0) / 2) and cond.t05_ratio_high == pytest.approx(
        (1.27 + 1900 / 4000) / 2)
    intro = (out / "report.md").read_text().split("## Per condition")[0]
    assert "speeds up" not in intro and "'later': cannot say" in intro
    assert "1 of them the reference's (seed(s) 1)" in intro
