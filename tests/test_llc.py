"""The local learning coefficient (optolab.measures.llc): devinterp's sampler against a
hand-written SGLD loop, the measure at checkpoints (rows, files, resume), post hoc, under
clamps, per head, and the calibration helper."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import optolab
from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.experiments import llc as posthoc
from optolab.measures import llc
from optolab.model.forward import PlainForward
from optolab.protocol.loader import validate_protocol
from optolab.tasks import IGNORE
from optolab.training.trainer import train
from tests.conftest import fewshot_protocol, write_protocol

pytest.importorskip("devinterp")


def _trained(tmp_path, steps=60, **extra):
    data = fewshot_protocol(steps=steps)
    data.update(extra)
    return train(validate_protocol(data), tmp_path / "run", progress=False)


def _hand_sgld(model, task, spec: llc.LLCSpec, batch_size: int) -> np.ndarray:
    """Lau et al.'s SGLD written out: w ← w − ε/2 (nβ ∇L + γ (w − w*)) + N(0, ε)."""
    m = spec.batch_size or batch_size
    batches = llc.sample_batches(task, spec, 0, m)

    def loss_of(w, b):
        logits = w(*b.inputs)
        return F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE)

    with torch.no_grad():
        init = np.array([loss_of(model, b).item() for b in batches])
    out = []
    gen = torch.Generator().manual_seed(12345)  # other noise than devinterp's chains: only the law must agree
    for _ in range(spec.chains):
        w = llc._copy(model, torch.device("cpu"))
        params = list(w.parameters())
        start = [p.detach().clone() for p in params]
        trace = []
        for b in batches:
            loss = loss_of(w, b)
            trace.append(loss.item())
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g, p0 in zip(params, grads, start):
                    drift = spec.nbeta * g + spec.localization * (p - p0)
                    p.add_(-0.5 * spec.step_size * drift)
                    p.add_(torch.randn(p.shape, generator=gen) * math.sqrt(spec.step_size))
        out.append(spec.nbeta * (np.mean(trace[spec.burn_in:]) - init[spec.burn_in:].mean()))
    return np.array(out)


def test_devinterp_agrees_with_a_hand_written_sgld_within_the_chain_spread(tmp_path):
    data = fewshot_protocol(steps=300)
    data["train"]["lr"] = 3e-3  # near a minimum: the LLC is a property of minima (away from one, SGLD descends)
    run = train(validate_protocol(data), tmp_path / "run", progress=False)
    spec = llc.LLCSpec(chains=6, draws=120, burn_in=30, step_size=1e-4, nbeta=300.0, localization=100.0)
    ours = llc.estimate(run.model, run.task, PlainForward(), spec, step=0, batch_size=16)
    hand = _hand_sgld(run.model, run.task, spec, 16)
    assert ours.finite and np.isfinite(hand).all()
    assert ours.mean > 0 and hand.mean() > 0
    spread = max(ours.std, float(np.std(hand, ddof=1)))
    assert abs(ours.mean - hand.mean()) <= spread, (ours.llc_per_chain, hand)


def test_the_estimate_is_deterministic_and_leaves_the_model_alone(tmp_path):
    run = _trained(tmp_path, steps=20)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    spec = llc.LLCSpec(chains=2, draws=20, burn_in=5)
    a = llc.estimate(run.model, run.task, PlainForward(), spec, step=0, batch_size=16)
    b = llc.estimate(run.model, run.task, PlainForward(), spec, step=0, batch_size=16)
    np.testing.assert_array_equal(a.traces, b.traces)
    assert a.traces.shape == (2, 25) and a.init_losses.shape == (25,)
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    c = llc.estimate(run.model, run.task, PlainForward(), spec.model_copy(update={"seed": 1}), step=0, batch_size=16)
    assert not np.array_equal(a.traces, c.traces)


def test_a_restricted_llc_moves_only_that_heads_slices(tmp_path):
    run = _trained(tmp_path, steps=20)
    w = llc._copy(run.model, torch.device("cpu"))
    params, masks = llc.head_masks(w, "L1H2")
    assert [tuple(m.shape) for m in masks] == [tuple(p.shape) for p in params]
    assert masks[0][:, 2].all() and not masks[0][:, [0, 1, 3]].any()  # W_Q [d, h, e]
    assert masks[3][2].all() and not masks[3][[0, 1, 3]].any()  # W_O [h, e, d]
    from devinterp.optim import SGMCMC

    start = {k: v.clone() for k, v in w.state_dict().items()}
    sampler = SGMCMC.sgld([{"params": params}], lr=1e-3, nbeta=10.0, mask=masks)
    b = run.task.train_batch(0, 0, 8)
    llc.batch_loss(PlainForward(), w, b, 0).backward()
    sampler.step()
    for k, v in w.state_dict().items():
        moved = v != start[k]
        if k in {f"blocks.1.attn.{n}" for n in ("W_Q", "W_K", "W_V")}:
            assert moved[:, 2].all() and not moved[:, [0, 1, 3]].any(), k
        elif k == "blocks.1.attn.W_O":
            assert moved[2].all() and not moved[[0, 1, 3]].any(), k
        else:
            assert not moved.any(), k


def test_measures_llc_switch_resolves_and_refuses_bad_heads(tmp_path):
    on = validate_protocol({**fewshot_protocol(), "measures": {"llc": True}})
    assert on.resolved()["measures"]["llc"]["nbeta"] == 3000.0
    assert validate_protocol({**fewshot_protocol(), "measures": {"llc": False}}).measures.llc is None
    assert validate_protocol(fewshot_protocol()).measures.llc is None  # off by default
    with pytest.raises(OptolabError, match="llc"):
        validate_protocol({**fewshot_protocol(), "measures": {"llc": {"heads": ["layer1"]}}})
    with pytest.raises(OptolabError, match="llc"):
        validate_protocol({**fewshot_protocol(), "measures": {"llc": {"chainz": 3}}})
    path = write_protocol(tmp_path, {**fewshot_protocol(), "measures": {"llc": {"heads": ["L5H0"]}}})
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_missing_devinterp_is_one_line(monkeypatch, capsys, tmp_path):
    import builtins

    real = builtins.__import__

    def no_devinterp(name, *a, **k):
        if name.startswith("devinterp"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_devinterp)
    path = write_protocol(tmp_path, {**fewshot_protocol(), "measures": {"llc": True}})
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optolab[llc]" in err[0] and "measures.llc" in err[0]


LLC_RUN = {"every": 2, "chains": 2, "draws": 15, "burn_in": 5, "heads": ["L1H0"]}


def _llc_protocol(**train):
    data = fewshot_protocol(steps=40, **train)
    data["measures"] = {**data["measures"], "llc": LLC_RUN}
    return validate_protocol(data)


def test_the_llc_runs_at_checkpoints_and_resumes_bit_identically(tmp_path):
    p = _llc_protocol()
    full = train(p, tmp_path / "full", progress=False)
    df = optolab.open_run(full.run_dir.path).metrics
    got = df[df.split == "llc"]
    # checkpoints at 0, 10, 20, 30, 40: every 2nd (0, 20, 40) and the last
    assert sorted(got[got.metric == "llc"].step.unique()) == [0, 20, 40]
    assert sorted(got[got.metric == "llc_head"]["head"].unique()) == [0]
    est = llc.load(full.run_dir.path / "measures" / "llc")
    assert sorted(est.step.unique()) == [0, 20, 40] and set(est.target) == {"model", "L1H0"}
    with np.load(full.run_dir.path / "measures" / "llc" / "traces_000000040.npz") as z:
        assert z["model_traces"].shape == (2, 20) and z["L1H0_init"].shape == (20,)
    summary = json.loads((full.run_dir.path / "summary.json").read_text())
    # 40 steps in, the loss is still falling: at the default nβ 3000 the chains find lower loss
    # (a negative LLC, flagged in the chain health), so only finiteness is asserted here
    assert math.isfinite(summary["final"]["llc"]["llc"]) and "L1H0" in summary["final"]["llc"]["llc_head"]
    assert all(h["verdict"] in llc.VERDICTS for h in est.health)
    assert any(p.name == "llc.png" for p in optolab.open_run(full.run_dir.path).plot())

    part = train(p, tmp_path / "part", progress=False, stop_after=25)
    resumed = train(p, tmp_path / "part", progress=False)
    a = llc.load(full.run_dir.path / "measures" / "llc").drop(columns=["config"])
    b = llc.load(resumed.run_dir.path / "measures" / "llc").drop(columns=["config"])
    pd.testing.assert_frame_equal(a, b)
    assert part.run_dir.path == resumed.run_dir.path


def test_post_hoc_equals_in_run_and_resumes_and_figures(tmp_path, capsys):
    run = train(_llc_protocol(), tmp_path / "run", progress=False)
    spec = llc.LLCSpec(**LLC_RUN)
    df, folder = posthoc.curve(run.run_dir.path, spec, progress=False)
    inrun = llc.load(run.run_dir.path / "measures" / "llc")
    merged = df.merge(inrun, on=["step", "target"], suffixes=("", "_run"))
    assert len(merged) == 6
    np.testing.assert_allclose(merged.llc, merged.llc_run, rtol=1e-6)  # same checkpoints, same config
    assert (folder / "llc.png").is_file() and (folder / "config.json").is_file()
    # the same command again skips what it has; another config gets its own folder
    mtime = (folder / "estimates.jsonl").stat().st_mtime_ns
    posthoc.curve(run.run_dir.path, spec, progress=False)
    assert (folder / "estimates.jsonl").stat().st_mtime_ns == mtime
    assert main(["llc", str(run.run_dir.path), "--steps", "10", "--chains", "2", "--draws", "10",
                 "--burn-in", "2"]) == 0
    assert len(list((run.run_dir.path / "measures" / "llc").glob("posthoc_*"))) == 2
    assert main(["llc", str(run.run_dir.path), "--steps", "11"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_the_llc_samples_under_the_runs_clamps(tmp_path):
    # layer 1 learns for 10 steps, then is ablated: at step 20 its weights matter only without the clamp
    clamped = {**fewshot_protocol(steps=20), "clamps": [{"kind": "ablate", "site": "z1", "window": {"start": 160}}]}
    run = train(validate_protocol(clamped), tmp_path / "run", progress=False)
    spec = llc.LLCSpec(chains=2, draws=20, burn_in=5)
    under, _ = posthoc.curve(run.run_dir.path, spec, steps=[20], progress=False)
    bare, _ = posthoc.curve(run.run_dir.path, spec.model_copy(update={"clamps": False}), steps=[20], progress=False)
    assert under.init_loss.iloc[0] != bare.init_loss.iloc[0]
    # under the clamp layer 1's heads do nothing: their restricted LLC is exactly 0
    forward = posthoc._forward(optolab.open_run(run.run_dir.path), spec, run.model)
    head = llc.estimate(run.model, run.task, forward, spec, step=llc.clamp_step(20, 20), batch_size=16, target="L1H1")
    forward.close()
    assert head.mean == 0.0 and np.array_equal(head.traces[0], head.init_losses)


def test_calibration_writes_its_table_and_traces_and_recommends(tmp_path, capsys):
    run = _trained(tmp_path, steps=20)
    spec = llc.LLCSpec(chains=2, draws=16, burn_in=4)
    df, folder = posthoc.calibrate(run.run_dir.path, spec, None, [1e-5, 1e-4], [30.0, 300.0])
    assert len(df) == 4 and set(df.verdict) <= set(llc.VERDICTS)
    assert (folder / "calibration.csv").is_file() and (folder / "traces.png").is_file()
    assert folder.name == "calibration_000000020"
    assert df.recommended.sum() == (1 if (df.verdict == "ok").any() else 0)
    assert ("recommended: " if df.recommended.any() else "no recommendation: ") in capsys.readouterr().out
    written = pd.read_csv(folder / "calibration.csv")
    assert {"max_excess", "max_trend", "verdict", "recommended"} <= set(written.columns)


def test_the_recommendation_is_the_smallest_ok_nbeta_at_its_largest_ok_step():
    table = pd.DataFrame({"step_size": [1e-5, 3e-5, 1e-4, 1e-5, 3e-5, 1e-4, 1e-5],
                          "nbeta": [1000, 1000, 1000, 3000, 3000, 3000, 300],
                          "verdict": ["ok", "ok", "left basin", "ok", "ok", "ok", "left basin"]})
    best, why = posthoc.recommend(table)
    assert (best.step_size, best.nbeta) == (3e-5, 1000) and "smallest nβ" in why
    none, why = posthoc.recommend(table.assign(verdict="left basin"))
    assert none is None and "larger nβ" in why


def _chain_traces(rng, level, n=250, chains=4, noise=0.01):
    return level + rng.normal(0, noise, (chains, n))


def test_chain_health_verdicts():
    rng = np.random.default_rng(0)
    init = np.full(250, 0.5) + rng.normal(0, 0.01, 250)
    per_chain = np.array([10.0, 12.0, 11.0, 9.0])
    near = _chain_traces(rng, 0.53)
    assert llc.health(near, init, per_chain, 50).verdict == "ok"
    drift = _chain_traces(rng, 0.5) + np.linspace(0, 0.12, 250)  # within the band, but still climbing at the end
    assert llc.health(drift, init, per_chain, 50).verdict == "drifting"
    below = _chain_traces(rng, 0.45)
    h = llc.health(below, init, -per_chain, 50)
    assert h.verdict == "negative" and "negative LLC" in h.warning()
    bad = near.copy()
    bad[1, 120:] = np.nan
    assert llc.health(bad, init, per_chain, 50).chain_verdicts[1] == "diverged"
    assert llc.health(bad, init, per_chain, 50).verdict == "diverged"


def test_a_chain_that_climbs_away_from_the_checkpoint_is_not_ok():
    """The traces the issue found called "ok" (issue 30): the sampled loss climbs from the
    checkpoint's 0.002 to ~2.2 (a model that has forgotten the task) during the burn-in and sits
    there. Settled and positive, so the old verdict (finite, positive, not drifting) passed it."""
    rng = np.random.default_rng(1)
    burn_in, draws = 50, 200
    t = np.arange(burn_in + draws)
    init = 0.002 + np.abs(rng.normal(0, 0.0005, len(t)))
    climb = 0.002 + 2.2 * (1 - np.exp(-t / 15.0))
    traces = climb + rng.normal(0, 0.05, (4, len(t)))
    per_chain = 9.2 * (traces[:, burn_in:].mean(1) - init[burn_in:].mean())
    h = llc.health(traces, init, per_chain, burn_in)
    assert h.verdict == "left basin" and min(h.excess) > 2.0
    assert "left its basin" in h.warning() and "Raise nβ" in h.warning()
    # the same chains started near the checkpoint and staying there are fine
    near = init + 0.03 + rng.normal(0, 0.01, (4, len(t)))
    assert llc.health(near, init, 300 * (near[:, burn_in:].mean(1) - init[burn_in:].mean()), burn_in).verdict == "ok"


def test_llc_settings_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    """issue 29: bad --step-sizes, --nbetas, --draws, --step-size: exit 2, one line naming the
    flag and the fix, no traceback, no pydantic dump, nothing new under the run directory."""
    run = _trained(tmp_path, steps=10)
    path = run.run_dir.path
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    cases = [(["--calibrate", "--step-sizes=-1e-4"], "--step-sizes", "> 0"),
             (["--calibrate", "--step-sizes", "nan"], "--step-sizes", "finite"),
             (["--calibrate", "--step-sizes", "1e-4", "inf"], "--step-sizes", "finite"),
             (["--calibrate", "--nbetas", "0"], "--nbetas", "> 0"),
             (["--draws", "0"], "--draws", "> 0"),
             (["--step-size=-1e-4"], "--step-size", "> 0"),
             (["--step-size", "-0.0001"], "--step-size", "> 0"),
             (["--nbeta", "0"], "--nbeta", "> 0"),
             (["--burn-in", "-1"], "--burn-in", ">= 0"),
             (["--calibrate", "--chains", "0"], "--chains", "> 0")]
    for args, flag, fix in cases:
        assert main(["llc", str(path), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag}:" in err[0] and "Fix:" in err[0] and fix in err[0], (args, err)
        assert "pydantic" not in err[0] and "http" not in err[0] and "Traceback" not in err[0]
        assert sorted(p.relative_to(path) for p in path.rglob("*")) == before, args


def test_a_curve_warns_about_negative_llcs(tmp_path, capsys):
    run = _trained(tmp_path, steps=10)
    spec = llc.LLCSpec(chains=2, draws=10, burn_in=2)
    df, folder = posthoc.curve(run.run_dir.path, spec, [0])
    out = capsys.readouterr().out
    est = llc.load(folder)
    verdicts = [h["verdict"] for h in est.health]
    assert est.llc.iloc[0] < 0 and verdicts == ["negative"]  # at init SGLD descends
    assert "warning: step 0, model: negative LLC" in out


def test_stages_read_the_llc_when_a_run_has_it():
    from optolab.training.summary import stage_signals

    xs = np.arange(0, 40) * 1000.0
    loss = np.where(xs < 20000, 1.0, 0.2)
    rows = [{"step": i, "sequences": x, "split": "main", "metric": "loss", "layer": None, "head": None,
             "src_layer": None, "value": v} for i, (x, v) in enumerate(zip(xs, loss))]
    llc_x = xs[::4]
    llc_y = np.where(llc_x < 10000, 5.0, np.where(llc_x < 24000, 2.0, 9.0))  # falls, then rises
    rows += [{"step": int(x / 1000), "sequences": x, "split": "llc", "metric": "llc", "layer": None, "head": None,
              "src_layer": None, "value": v} for x, v in zip(llc_x, llc_y)]
    signals = stage_signals(pd.DataFrame(rows), "main")
    assert {"llc rises", "llc falls"} <= set(signals)
    np.testing.assert_array_equal(signals["llc rises"].ys, llc_y)


def test_stages_read_only_the_llc_estimates_whose_chains_are_healthy():
    # stages_llc at seed 0: the estimates across the drop are negative (the chains find lower loss
    # than the checkpoint), and read as a curve they made an "llc falls" on the plateau
    from optolab.training.summary import stage_signals

    xs = np.arange(0, 40) * 1000.0
    rows = [{"step": i, "sequences": x, "split": "main", "metric": "loss", "layer": None, "head": None,
             "src_layer": None, "value": 1.0 if x < 20000 else 0.2} for i, x in enumerate(xs)]
    llc_x = xs[::4]
    llc_y = np.where((llc_x >= 16000) & (llc_x < 28000), -300.0, 100.0 + llc_x / 1000)
    ok = (llc_y > 0).astype(float)
    for metric, values in (("llc", llc_y), ("llc_ok", ok)):
        rows += [{"step": int(x / 1000), "sequences": x, "split": "llc", "metric": metric, "layer": None,
                  "head": None, "src_layer": None, "value": v} for x, v in zip(llc_x, values)]
    signals = stage_signals(pd.DataFrame(rows), "main")
    np.testing.assert_array_equal(signals["llc rises"].xs, llc_x[ok == 1])
    assert (signals["llc falls"].ys > 0).all()
    without = stage_signals(pd.DataFrame([r for r in rows if r["metric"] != "llc_ok"]), "main")
    assert len(without["llc rises"].xs) == len(llc_x)  # runs written before the marker: every estimate


def test_llc_rows_mark_whether_each_estimate_may_be_read():
    spec = llc.LLCSpec(chains=2, draws=10, burn_in=2).model_dump(mode="json")
    flat = np.full((2, 12), 0.5)  # chains sampling at the checkpoint's loss: near it, no trend
    near = llc.Estimate("model", np.array([40.0, 42.0]), flat, np.full(12, 0.5), 100.0, spec)
    below = llc.Estimate("L1H3", np.array([-40.0, -42.0]), flat, np.full(12, 0.5), 100.0, spec)
    assert near.health().verdict == "ok" and below.health().verdict == "negative"
    marks = {(r["metric"], r["head"]): r["value"] for r in llc.rows([near, below])}
    assert marks[("llc_ok", None)] == 1.0 and marks[("llc_head_ok", 3)] == 0.0
    assert set(marks) == {("llc", None), ("llc_std", None), ("llc_ok", None),
                          ("llc_head", 3), ("llc_head_std", 3), ("llc_head_ok", 3)}


def test_the_llc_samples_the_data_the_run_trains_on_at_that_step():
    from optolab.protocol.data_schedule import train_data
    from optolab.tasks import make_task

    b2 = {**fewshot_protocol()["task"], "burstiness": 2}
    p = validate_protocol({**fewshot_protocol(steps=30),
                           "data": {"tasks": {"b2": b2}, "phases": [{"task": "b2", "window": {"start": 10, "unit": "steps"}}]}})
    data = train_data(p, make_task(p.task))
    spec = llc.LLCSpec(draws=3, burn_in=0)
    before, after = llc.sample_batches(data, spec, 5, 8), llc.sample_batches(data, spec, 20, 8)
    own = llc.sample_batches(make_task(p.task), spec, 5, 8)
    other = llc.sample_batches(make_task(validate_protocol({**fewshot_protocol(), "task": b2}).task), spec, 20, 8)
    assert all(torch.equal(a.targets, b.targets) and torch.equal(a.inputs[0], b.inputs[0]) for a, b in zip(before, own))
    assert all(torch.equal(a.inputs[0], b.inputs[0]) for a, b in zip(after, other))
    assert not torch.equal(before[0].inputs[0], before[1].inputs[0])  # each SGLD step its own batch


def test_an_ensemble_member_estimates_the_llc_of_its_solo_run(tmp_path):
    from optolab.training.ensemble import train_ensemble

    protocols = []
    for seed in (0, 1):
        data = fewshot_protocol(steps=20)
        data["seeds"] = {"init": seed, "data": seed}
        data["measures"] = {**data["measures"], "llc": {"every": 2, "chains": 2, "draws": 10, "burn_in": 2}}
        protocols.append(validate_protocol(data))
    train_ensemble(protocols, [tmp_path / "m0", tmp_path / "m1"])
    for i, p in enumerate(protocols):
        solo = train(p, tmp_path / f"solo{i}", progress=False)
        a = llc.load(tmp_path / f"m{i}" / "measures" / "llc").sort_values(["step", "target"])
        b = llc.load(solo.run_dir.path / "measures" / "llc").sort_values(["step", "target"])
        assert list(a.step) == list(b.step) == [0, 20]
        # members' weights equal their solo runs' up to float summation order (test_ensemble)
        np.testing.assert_allclose(a.llc, b.llc, rtol=1e-3, atol=1e-3)
