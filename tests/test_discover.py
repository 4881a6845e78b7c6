"""optolab discover: the stages on a simulated response (screen finds the planted effect,
confirmation, the window search finds its planted critical window, the dose), resumption at
every stage boundary, the formation map, and one tiny real run through real sweeps."""

from __future__ import annotations

import json
import re
import numpy as np
import pytest
import yaml

from optolab.experiments import discover

from .conftest import fewshot_protocol

T_REF = 10_000.0
CRITICAL = (0.3, 0.6)  # the planted head's window of influence, in units of the reference's crossing


def _clamp_effect(clamps: list[dict], strength_default=1.0) -> float:
    """The planted truth: only prev_token on L0H1 delays the crossing, by 1.6x (at strength 1)
    when it covers the whole critical window, in proportion to the part it covers."""
    ratio = 1.0
    for c in clamps:
        if c.get("to") == "previous_token" and c.get("heads") == [1]:
            w = c.get("window")
            lo, hi = CRITICAL
            cover = 1.0 if w is None else max(0.0, min(w["stop"] / T_REF, hi) - max(w["start"] / T_REF, lo)) / (hi - lo)
            ratio *= 1 + 0.6 * cover * c.get("strength", strength_default)
    return ratio


class FakeSweeps:
    """Stands in for run_round/times: records which runs each sweep file asked for, and times
    them from the planted response with a little seed noise."""

    def __init__(self) -> None:
        self.ran: dict[str, dict[str, dict[int, float]]] = {}
        self.calls = 0

    def run_round(self, ctx, file, sweep_dir) -> None:
        self.calls += 1
        data = yaml.safe_load(file.read_text())
        got = self.ran.setdefault(str(sweep_dir), {})
        for c in data["conditions"]:
            for s in c["seeds"]:
                ref = T_REF * float(np.exp(np.random.default_rng(s).normal(0, 0.2)))
                noise = float(np.exp(np.random.default_rng(10_000 + s).normal(0, 0.02)))
                got.setdefault(c["name"], {})[s] = ref * _clamp_effect(c.get("clamps", [])) * noise

    def times(self, sweep_dir, loss):
        return {k: dict(v) for k, v in self.ran.get(str(sweep_dir), {}).items()}


def _spec(tmp_path, steps=4000, **extra):
    base = fewshot_protocol(steps=steps)  # the simulated tests train nothing: a budget past 3 x T_REF
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"protocol": "base.yaml", "targets": {"heads": {"layers": [0], "heads": [0, 1, 2]}},
            "interventions": {"prev": {"kind": "set", "site": "blocks.{layer}.attn.hook_pattern", "heads": ["{head}"],
                                       "to": "previous_token"}},
            "seeds": {"start": 6, "add": 2, "max": 8}, "confirm": {"start": 6, "add": 2, "max": 8},
            "windows": {"effect": 0.1, "resolution": 0.1, "seeds": 6, "top": 1},
            "dose": {"prev": {"field": "strength", "values": [0.25, 1.0]}}, **extra}
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture()
def fake(monkeypatch):
    f = FakeSweeps()
    monkeypatch.setattr(discover, "run_round", f.run_round)
    monkeypatch.setattr(discover, "times", f.times)
    return f


def test_stages_find_the_planted_effect_and_window(tmp_path, fake):
    record = discover.run_discover(_spec(tmp_path), tmp_path / "out", progress=lambda *_: None)
    st = record["stages"]
    screen = st["screen"]["verdicts"]
    assert screen["prev_L0H1"]["verdict"] == "effect" and screen["prev_L0H1"]["direction"] == "delay"
    assert {screen[n]["verdict"] for n in ("prev_L0H0", "prev_L0H2")} == {"null"}
    assert st["confirm"]["verdicts"]["prev_L0H1"]["confirmed"]
    assert set(st["confirm"]["verdicts"]) == {"prev_L0H1"}  # only the hit is confirmed
    search = st["windows"]["searches"]["prev_L0H1"]
    need = 0.1 / 0.6 * (CRITICAL[1] - CRITICAL[0])  # overlap moving the time by 10 %
    lo, hi = search["latest_start"]["bracket"]
    assert lo - 0.02 <= CRITICAL[1] - need <= hi + 0.02  # T_event is the noisy median, not exactly T_REF
    lo, hi = search["earliest_stop"]["bracket"]
    assert lo - 0.02 <= CRITICAL[0] + need <= hi + 0.02
    doses = st["dose"]["doses"]
    assert doses["0.25"]["ratio"] < doses["1"]["ratio"]
    text = (tmp_path / "out" / "formation_map.md").read_text()
    for part in ("## What matters", "## When", "## How much", "## Unresolved and why", "## Compute per stage",
                 "prev_L0H1"):
        assert part in text


@pytest.mark.parametrize("boundary", discover.STAGES[:-1])
def test_resume_at_every_stage_boundary(tmp_path, fake, boundary):
    """Stopped after a stage, the same command goes on from the next one (no round of a recorded
    stage is run again) and ends with the record of an uninterrupted discovery."""
    path = _spec(tmp_path)
    whole = discover.run_discover(path, tmp_path / "whole", progress=lambda *_: None)
    calls = fake.calls
    discover.run_discover(path, tmp_path / "split", stop_after=boundary, progress=lambda *_: None)
    first = fake.calls - calls
    recorded = json.loads((tmp_path / "split" / "discover.json").read_text())["stages"]
    assert list(recorded) == list(discover.STAGES[: discover.STAGES.index(boundary) + 1])
    got = discover.run_discover(path, tmp_path / "split", progress=lambda *_: None)
    assert fake.calls - calls == calls  # the two halves ran exactly the rounds of one discovery
    assert first < calls

    def strip(rec):
        return {k: {kk: vv for kk, vv in v.items() if kk not in ("wall_s", "dir")} for k, v in rec["stages"].items()}

    assert strip(got) == strip(whole)


def test_dry_run_plan(tmp_path):
    lines = discover.plan(_spec(tmp_path))
    text = "\n".join(lines)
    assert "screen" in text and "CPU-min" in text
    assert " 24 " in lines[3] or "24" in lines[3]  # 3 conditions + reference, 6 seeds each
    # calibrated on the runs as the stages make them: the question's evals cost less than all of them
    every = "\n".join(discover.plan(_spec(tmp_path, evals="all")))
    per_eval = [float(re.search(r"(\d+) ms per eval", t).group(1)) for t in (text, every)]
    assert "evals: question" in text and per_eval[0] < per_eval[1]


def _edit(out, stage, name, **values):
    path = out / "discover.json"
    record = json.loads(path.read_text())
    record["stages"][stage]["verdicts"][name].update(values)
    path.write_text(json.dumps(record))


def test_tiny_real_discovery(tmp_path):
    """Real sweeps end to end on a 40-step model, resumed at each stage boundary: the screen's
    runs stop at their answer; with its verdicts set by hand to an effect (a 40-step model has
    none to find), the confirmation, the window probes (windowed clamps, real runs) and the dose
    run, and the map is written."""
    path = _spec(tmp_path, steps=40, question={"loss": 1.65, "margin_evals": 1, "cap": 3.0},
                 targets={"heads": {"layers": [0], "heads": [0]}}, seeds={"start": 6, "add": 2, "max": 6},
                 confirm={"start": 6, "add": 2, "max": 6, "offset": 100},
                 windows={"effect": 0.05, "resolution": 1.0, "seeds": 2, "top": 1},
                 dose={"prev": {"field": "strength", "values": [0.5]}})
    out = tmp_path / "out"
    quiet = {"workers": 1, "progress": lambda *_: None}
    record = discover.run_discover(path, out, stop_after="screen", **quiet)
    v = record["stages"]["screen"]["verdicts"]["prev_L0H0"]
    assert v["verdict"] in ("effect", "null", "open") and v["n_pairs"] <= 6
    runs = list((out / "1_screen").glob("*_s*/summary.json"))
    assert len(runs) == 12
    stopped = [json.loads(s.read_text()) for s in runs]
    assert any(s["status"] == "stopped" for s in stopped)
    assert all(s["status"] == "finished" or s["final_step"] < 40 for s in stopped)
    _edit(out, "screen", "prev_L0H0", verdict="effect", direction="delay")
    discover.run_discover(path, out, stop_after="confirm", **quiet)
    assert len(list((out / "2_confirm").glob("*_s1*/summary.json"))) == 12  # fresh seeds 100..105
    _edit(out, "confirm", "prev_L0H0", confirmed=True, direction="delay", ratio=1.2)
    record = discover.run_discover(path, out, **quiet)
    search = record["stages"]["windows"]["searches"]["prev_L0H0"]
    assert search["latest_start"]["probes"] and search["earliest_stop"]["probes"]
    probes = list((out / "3_windows").glob("*/protocol.yaml"))
    assert probes and all("window" in yaml.safe_load(p.read_text())["clamps"][-1] for p in probes)
    assert set(record["stages"]["dose"]["doses"]) == {"0.5"}
    assert "## When" in (out / "formation_map.md").read_text()
    assert record["stages"]["screen"]["compute_s"] > 0


def test_shipped_discover_files_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "protocols" / "discover").glob("*.yaml"))
    assert files
    for f in files:
        spec = discover.load(f)
        assert len(discover.screen_conditions(spec, str((f.parent / spec.protocol).resolve()))) == 16


def test_windows_relative_to_the_drop_need_the_curve_past_the_crossing(tmp_path):
    from optolab.core.errors import OptolabError

    base = {"name": "x", "protocol": "p.yaml", "targets": {"heads": {"layers": [0]}},
            "interventions": {"a": {"kind": "ablate", "site": "blocks.{layer}.attn.hook_v", "heads": ["{head}"]}},
            "question": {"loss": 0.5, "margin_evals": 1}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(fewshot_protocol(steps=40)))
    f = tmp_path / "d.yaml"
    f.write_text(yaml.safe_dump({**base, "windows": {"relative_to": "drop_onset"}}))
    with pytest.raises(OptolabError, match="margin_evals must be at least 3"):
        discover.load(f)
    f.write_text(yaml.safe_dump({**base, "windows": {"relative_to": "crossing"}}))
    assert discover.load(f).question.margin_evals == 1  # the crossing alone needs no more


def test_an_out_holding_another_discovery_is_refused_with_nothing_written(tmp_path, fake):
    from optolab.core.errors import OptolabError

    path = _spec(tmp_path)
    discover.run_discover(path, tmp_path / "out", stop_after="screen", progress=lambda *_: None)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    other = yaml.safe_load(path.read_text())
    other["margin"] = 0.2  # a different question: the recorded screen's verdicts are not its answers
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(OptolabError, match=r"another file \(fields differ: margin\)"):
        discover.run_discover(tmp_path / "other.yaml", tmp_path / "out", progress=lambda *_: None)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before
    discover.run_discover(path, tmp_path / "out", progress=lambda *_: None)  # its own file goes on


def test_a_bad_intervention_or_dose_is_refused_before_anything_is_written(tmp_path):
    from optolab.core.errors import OptolabError

    path = _spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    for change, words in (({"interventions": {"prev": {**spec["interventions"]["prev"], "to": "nowhere"}}},
                           "interventions.prev"),
                          ({"dose": {"prev": {"field": "strength", "values": [-1.0]}}}, "interventions.prev.strength")):
        path.write_text(yaml.safe_dump({**spec, **change}))
        with pytest.raises(OptolabError, match=re.escape(words)):
            discover.run_discover(path, tmp_path / "out", progress=lambda *_: None)
        assert not (tmp_path / "out").exists()


def test_live_progress_counts_runs_and_steps(tmp_path):
    """progress.json from the runs' own files: a finished run, a run stopped at its answer (its
    unrun steps leave the total), one training, one waiting."""
    from optolab.experiments.progress import LiveProgress

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"final_step": 100}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"final_step": 30, "stopped": {"step": 30}}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 40}\n{"step": 50, "torn')
    lines = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    with LiveProgress(tmp_path, {"a": 100, "b": 100, "c": 100, "d": 100}, True, interval=0.01, print_every=0.0,
                      stream=Stream()) as live:
        view = live.poll()
    assert view["runs"] == {"total": 4, "finished": 2, "running": 1, "waiting": 1}
    assert view["steps"] == {"done": 100 + 30 + 40, "total": 100 + 30 + 100 + 100}
    assert json.loads((tmp_path / "progress.json").read_text())["runs"]["finished"] == 2
    assert view["eta_is_upper_bound"]
