"""Designs in sweep files (screen, window_scan, dose): expansion into conditions, the filled
clamps, one-line refusals naming the design field, --max-runs, and grids over a field that
some condition lacks (refused, or applied where present when the file says so)."""

from __future__ import annotations

import json

import pytest
import yaml

from optolab.cli import main
from optolab.experiments.designs import _compact
from optolab.experiments.sweep import load_sweep, plan_sweep

from .conftest import fewshot_protocol, write_protocol

# the tiny model of conftest.fewshot_protocol: 2 layers × 4 heads; 30 steps of 16 sequences
SCREEN = {"kind": "screen", "reference": "none", "targets": {"heads": {"layers": [0, 1]}},
          "interventions": {
              "ablate": {"kind": "ablate", "site": "blocks.{layer}.attn.hook_v", "heads": ["{head}"]},
              "prev_token": {"kind": "set", "site": "blocks.{layer}.attn.hook_pattern", "heads": ["{head}"],
                             "to": "previous_token"}}}
PREV = {"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [1], "to": "previous_token"}


def _sweep(tmp_path, design=None, **extra) -> str:
    write_protocol(tmp_path, fewshot_protocol(), "base.yaml")
    data = {"name": "tiny", "protocol": "base.yaml", "seeds": [0], **extra}
    if design is not None:
        data["design"] = design
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _clamps(run) -> list[dict]:
    return run.protocol.resolved()["clamps"]


def _refused(tmp_path, capsys, path, *words, argv=()) -> str:
    out = tmp_path / "out"
    assert main(["sweep", path, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Fix:" in err, err
    assert "sweep.yaml" in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()  # nothing written
    return err


def test_a_screen_crosses_every_head_of_the_listed_layers_with_every_intervention(tmp_path):
    spec, runs = load_sweep(_sweep(tmp_path, SCREEN, seeds=[0, 1]))
    names = ["none"] + [f"{i}_L{layer}H{h}" for i in ("ablate", "prev_token") for layer in (0, 1) for h in range(4)]
    assert [c.name for c in spec.conditions] == names and spec.reference == "none"
    assert sorted(runs) == sorted(f"{n}_s{s}" for n in names for s in (0, 1))
    assert _clamps(runs["none_s0"]) == []
    (ablate,) = _clamps(runs["ablate_L1H3_s1"])
    assert (ablate["kind"], ablate["site"], ablate["heads"], ablate["name"]) == \
        ("ablate", "blocks.1.attn.hook_v", [3], "ablate_L1H3")
    (prev,) = _clamps(runs["prev_token_L0H2_s0"])
    assert (prev["site"], prev["heads"], prev["to"]) == ("blocks.0.attn.hook_pattern", [2], "previous_token")
    # downstream is unchanged: the runs pack into jobs like any conditions'
    _, runs2, _, jobs, _ = plan_sweep(_sweep(tmp_path, SCREEN, stop_at_answer=False), tmp_path / "out", workers=2,
                                      pack="auto", max_pack=8)
    assert sorted(r for job in jobs for r in job) == sorted(runs2) and len(runs2) == 17
    assert all(runs2[r].protocol.train.stop is None for r in runs2)
    # stop-at-answer is on by default for designs: the reference trains first, its crossing caps the others
    _, runs3, _, jobs, _ = plan_sweep(_sweep(tmp_path, SCREEN), tmp_path / "out", workers=2, pack="auto", max_pack=8)
    assert [r for job in jobs for r in job] == ["none_s0"] and runs3["none_s0"].protocol.train.stop.threshold == 0.5


def test_screen_targets_heads_lists_other_heads_params_and_the_base_clamps(tmp_path):
    base = {**fewshot_protocol(), "clamps": [{"kind": "ablate", "name": "keep", "site": "blocks.1.attn.hook_z",
                                              "heads": [0]}]}
    write_protocol(tmp_path, base, "clamped.yaml")
    design = {"kind": "screen", "protocol": "clamped.yaml", "targets": {"heads": {"layers": [1], "heads": [1, 3]}},
              "interventions": {"only": {"kind": "ablate", "site": "blocks.{layer}.attn.hook_v",
                                         "heads": "{other_heads}"},
                                "copy": {"kind": "perfect_copy", "layer": "{layer}", "head": "{head}"}}}
    spec, runs = load_sweep(_sweep(tmp_path, design))
    assert sorted(runs) == ["copy_L1H1_s0", "copy_L1H3_s0", "only_L1H1_s0", "only_L1H3_s0"]
    assert spec.reference is None
    keep, only = _clamps(runs["only_L1H3_s0"])  # the base protocol's clamps come first
    assert keep["name"] == "keep" and only["heads"] == [0, 1, 2]
    _, copy = _clamps(runs["copy_L1H1_s0"])
    assert (copy["layer"], copy["head"]) == (1, 1)  # a lone placeholder is the number itself
    params = {"kind": "screen", "targets": {"params": ["blocks.0.attn.W_V", "W_U"]},
              "interventions": {"freeze": {"kind": "freeze", "param": "{param}"}}}
    _, runs = load_sweep(_sweep(tmp_path, params))
    assert sorted(runs) == ["freeze_W_U_s0", "freeze_blocks.0.attn.W_V_s0"]
    assert _clamps(runs["freeze_W_U_s0"])[0]["param"] == "W_U"


def test_listed_conditions_stay_and_the_design_conditions_follow_them(tmp_path):
    spec, runs = load_sweep(_sweep(tmp_path, {"kind": "dose", "clamp": PREV, "field": "strength",
                                              "values": [0.5]},
                                   conditions=[{"name": "plain"}], reference="plain"))
    assert [c.name for c in spec.conditions] == ["plain", "dose_0.5"] and spec.reference == "plain"
    assert sorted(runs) == ["dose_0.5_s0", "plain_s0"]


def test_a_window_scan_slides_the_window_clips_at_the_end_and_merges_what_clips_alike(tmp_path):
    design = {"kind": "window_scan", "reference": "none", "clamp": PREV, "unit": "steps",
              "starts": [0, 20], "lengths": [10, 15]}
    spec, runs = load_sweep(_sweep(tmp_path, design))
    # [20, 35) runs past the 30 steps: clipped to [20, 30), the same window as length 10
    assert [c.name for c in spec.conditions] == ["none", "win_s0_l10", "win_s0_l15", "win_s20_l10"]
    windows = {r.condition: _clamps(r)[0]["window"] for r in runs.values() if r.condition != "none"}
    assert windows == {"win_s0_l10": {"start": 0, "stop": 10, "unit": "steps"},
                       "win_s0_l15": {"start": 0, "stop": 15, "unit": "steps"},
                       "win_s20_l10": {"start": 20, "stop": 30, "unit": "steps"}}
    assert runs["win_s0_l10_s0"].group == "win_s0_l10"


def test_a_window_scan_in_sequences_and_relative_to_the_budget(tmp_path):
    design = {"kind": "window_scan", "clamp": [PREV, {**PREV, "heads": [2]}], "starts": [0, 160], "lengths": [160]}
    spec, runs = load_sweep(_sweep(tmp_path, design))  # unit: sequences by default; 480 in the budget
    assert [c.name for c in spec.conditions] == ["win_s0_l160", "win_s160_l160"]
    a, b = _clamps(runs["win_s160_l160_s0"])  # every clamp of the list gets the window
    assert a["window"] == b["window"] == {"start": 160, "stop": 320, "unit": "sequences"}
    assert (a["name"], b["name"]) == ("win_s160_l160.0", "win_s160_l160.1")
    relative = {"kind": "window_scan", "clamp": PREV, "relative_to": "budget", "starts": [0, 0.5], "lengths": [0.5]}
    _, runs = load_sweep(_sweep(tmp_path, relative))
    assert sorted(runs) == ["win_s0.5_l0.5_s0", "win_s0_l0.5_s0"]
    assert _clamps(runs["win_s0.5_l0.5_s0"])[0]["window"] == {"start": 15, "stop": 30, "unit": "steps"}


def test_window_names_use_the_shortest_exact_number():
    assert [_compact(n) for n in (0, 500, 1000, 20000, 25000, 150000, 12345, 600000)] == \
        ["0", "500", "1e3", "2e4", "2.5e4", "1.5e5", "12345", "6e5"]


def test_a_dose_sets_the_field_of_the_design_clamp_to_each_value(tmp_path):
    design = {"kind": "dose", "reference": "none", "clamp": PREV, "field": "strength", "values": [0, 0.5, 1.0]}
    spec, runs = load_sweep(_sweep(tmp_path, design, seeds=[0, 1]))
    assert [c.name for c in spec.conditions] == ["none", "dose_0", "dose_0.5", "dose_1.0"]
    assert len(runs) == 8
    assert [_clamps(runs[f"dose_{v}_s1"])[0]["strength"] for v in ("0", "0.5", "1.0")] == [0.0, 0.5, 1.0]
    assert _clamps(runs["dose_0.5_s0"])[0]["name"] == "dose_0.5"


@pytest.mark.parametrize("design, words", [
    ({**SCREEN, "kind": "scren"}, ["design.kind", "did you mean 'screen'"]),
    ({**SCREEN, "interventions": {"ablate": {"kind": "ablate", "site": "blocks.{layer}.attn.hook_v",
                                             "heads": ["{hed}"]}}},
     ["design.interventions.ablate.heads.0", "{hed}", "did you mean {head}"]),
    ({**SCREEN, "interventions": {"ablate": {"kind": "ablate", "site": "blocks.{layer}.attn.hook_vv",
                                             "heads": ["{head}"]}}},
     ["design.interventions.ablate.site", "hook_vv"]),
    ({**SCREEN, "interventions": {"ablate": {"kind": "ablate", "site": "blocks.{layer}.attn.hook_v"}}},
     ["design.interventions.ablate", "the same clamp"]),
    ({**SCREEN, "targets": {"heads": {"layers": [2]}}}, ["design.targets.heads.layers", "0..1"]),
    ({**SCREEN, "targets": {"heads": {"layers": [0]}, "sites": ["v0"]}}, ["design.targets", "exactly one"]),
    ({"kind": "window_scan", "clamp": {**PREV, "window": {"start": 0}}, "starts": [0], "lengths": [5]},
     ["design.clamp.window", "remove window"]),
    ({"kind": "window_scan", "clamp": PREV, "start": [0], "lengths": [5]}, ["design.start", "did you mean 'starts'"]),
    ({"kind": "window_scan", "clamp": PREV, "unit": "steps", "starts": [30], "lengths": [5]},
     ["design.starts", "past the end of training"]),
    ({"kind": "window_scan", "clamp": PREV, "starts": [1], "lengths": [10]}, ["design.lengths", "covers no training"]),
    ({"kind": "window_scan", "clamp": PREV, "relative_to": "budget", "unit": "steps", "starts": [0],
      "lengths": [0.5]}, ["design.unit"]),
    ({"kind": "window_scan", "clamp": PREV, "relative_to": "budget", "starts": [1.5], "lengths": [0.5]},
     ["design.starts", "fraction"]),
    ({"kind": "dose", "clamp": PREV, "field": "strenght", "values": [0.5]},
     ["design.field", "did you mean 'strength'"]),
    ({"kind": "dose", "clamp": PREV, "field": "strength", "values": [0.5, 1.5]}, ["design.values.1", "<= 1"]),
    ({"kind": "dose", "clamp": {**PREV, "strength": 1.0}, "field": "strength", "values": [0.5]},
     ["design.clamp.strength", "remove strength"]),
    ({"kind": "dose", "clamp": PREV, "field": "strength", "values": []}, ["design.values", "at least one"]),
    ({"kind": "window_scan", "clamp": PREV, "starts": [], "lengths": [5]}, ["design.starts", "at least one"]),
    ({**SCREEN, "interventions": {}}, ["design.interventions", "no interventions"]),
    ({"kind": "dose", "clamp": [], "field": "strength", "values": [0.5]}, ["design.clamp", "empty list of clamps"]),
])
def test_a_bad_design_is_refused_in_one_line_naming_the_design_field(tmp_path, capsys, design, words):
    _refused(tmp_path, capsys, _sweep(tmp_path, design), *words)


def test_a_design_over_max_runs_is_refused_before_it_is_built(tmp_path, capsys):
    path = _sweep(tmp_path, SCREEN, seeds=[0, 1])  # (1 + 2 layers × 4 heads × 2) × 2 seeds = 34 runs
    _refused(tmp_path, capsys, path, "design", "34 runs", "--max-runs 34", argv=["--max-runs", "20"])
    _, runs = load_sweep(path, max_runs=34)
    assert len(runs) == 34


def test_a_design_condition_named_like_a_listed_one_is_refused(tmp_path, capsys):
    path = _sweep(tmp_path, SCREEN, conditions=[{"name": "ablate_L0H1"}])
    _refused(tmp_path, capsys, path, "design", "ablate_L0H1", "conditions.0")


CONDITIONS = [{"name": "none"}, {"name": "ablated", "clamps": [{"kind": "ablate", "site": "v0", "heads": [0]}]},
              {"name": "prev", "clamps": [PREV]}]


def test_a_grid_over_a_field_some_condition_lacks_is_refused_in_one_line(tmp_path, capsys):
    # 'none' has no clamp 0 at all
    path = _sweep(tmp_path, conditions=CONDITIONS, grid={"clamps.0.strength": [0.5, 1.0]})
    _refused(tmp_path, capsys, path, "grid.clamps.0.strength", "condition 'none'", "grid_where_present: true")
    # 'ablated' has a clamp 0, but an ablation has no strength
    path = _sweep(tmp_path, conditions=CONDITIONS[1:], grid={"clamps.0.strength": [0.5, 1.0]})
    _refused(tmp_path, capsys, path, "clamps.0.strength", "ablated", "grid_where_present: true")


def test_grid_where_present_applies_a_grid_only_to_conditions_that_have_the_field(tmp_path, capsys):
    path = _sweep(tmp_path, conditions=CONDITIONS, grid={"clamps.0.strength": [0.5, 1.0]}, grid_where_present=True)
    _, runs = load_sweep(path)
    assert sorted(runs) == ["ablated_s0", "none_s0", "prev__strength-0.5_s0", "prev__strength-1.0_s0"]
    assert _clamps(runs["prev__strength-0.5_s0"])[0]["strength"] == 0.5
    assert runs["ablated_s0"].point == {} and _clamps(runs["ablated_s0"])[0]["kind"] == "ablate"
    # a field that no condition has is a typo, refused all the same
    path = _sweep(tmp_path, conditions=CONDITIONS, grid={"clamps.0.strenght": [0.5]}, grid_where_present=True)
    _refused(tmp_path, capsys, path, "grid.clamps.0.strenght", "no condition")


def test_a_grid_where_present_crosses_a_design_too(tmp_path):
    design = {"kind": "window_scan", "reference": "none", "clamp": PREV, "unit": "steps", "starts": [0],
              "lengths": [10]}
    _, runs = load_sweep(_sweep(tmp_path, design, grid={"clamps.0.strength": [0.5]}, grid_where_present=True))
    assert sorted(runs) == ["none_s0", "win_s0_l10__strength-0.5_s0"]


def test_the_docs_design_examples_expand_as_documented(tmp_path):
    from .conftest import ROOT

    section = (ROOT / "docs" / "sweeps-and-reports.md").read_text().split("## Designs", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b.split("```", 1)[0]) for b in section.split("```yaml")[1:]]
    counts = []
    for block in blocks:
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"protocol": str(ROOT / "protocols" / "singh2024" / "fig5b_none.yaml"),
                                        **block}))
        spec, runs = load_sweep(path)
        counts.append(len(spec.conditions))
    assert counts == [17, 12, 5]  # 8 heads × 2 + none; 11 windows (one clipped onto another) + none; 5 doses


def test_a_window_scan_reads_its_times_on_the_unclamped_model(tmp_path):
    """c9baccf's window scans kept ``apply_at: both``: an eval inside a window read the clamp's
    output (the quickstart's loss spiked to ~2 at every window start and a window over the final
    eval gave final_loss 0.75). Now the window's clamp acts on training only: at the window's
    first eval the weights are the reference's (the clamp has not yet trained them), so the two
    runs' losses there are equal; read through the clamp they are not."""
    from optolab.training.trainer import train

    design = {"kind": "window_scan", "reference": "none", "clamp": PREV, "unit": "steps", "starts": [20],
              "lengths": [10]}
    spec, runs = load_sweep(_sweep(tmp_path, design))
    (clamp,) = _clamps(runs["win_s20_l10_s0"])
    assert clamp["apply_at"] == "train"
    results = {rid: train(r.protocol, tmp_path / rid, progress=False) for rid, r in runs.items()}

    def loss_at(rid, step):
        m = results[rid].run_dir.metrics()
        split = results[rid].task.main_split
        return float(m[(m.split == split) & (m.metric == "loss") & (m.step == step)].value.iloc[0])

    assert loss_at("win_s20_l10_s0", 20) == loss_at("none_s0", 20)
    summary = json.loads((tmp_path / "win_s20_l10_s0" / "summary.json").read_text())
    assert summary["readout"] == {"model": "unclamped", "clamps": []}
    # the same clamp read through at evals (apply_at: both, c9baccf's default) moves the step-20 loss
    both = {**design, "clamp": {**PREV, "apply_at": "both"}}
    _, runs = load_sweep(_sweep(tmp_path, both))
    through = train(runs["win_s20_l10_s0"].protocol, tmp_path / "through", progress=False)
    m = through.run_dir.metrics()
    at20 = float(m[(m.split == through.task.main_split) & (m.metric == "loss") & (m.step == 20)].value.iloc[0])
    assert abs(at20 - loss_at("none_s0", 20)) > 1e-3
    summary = json.loads((tmp_path / "through" / "summary.json").read_text())
    assert summary["readout"]["model"] == "clamped inside windows"
    assert summary["readout"]["clamps"] == [{"clamp": "win_s20_l10", "steps": [20, 30]}]
