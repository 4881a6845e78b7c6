"""Ensembles: each member's run directory equals the same run done alone (within a stated
tolerance, per clamp kind, in seed ensembles and in ensembles of mixed conditions), resumes
work, and incompatible runs are never packed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from optolab.clamps.union import pass_signature
from optolab.protocol.loader import validate_protocol
from optolab.training.ensemble import condition_key, pack_key, train_ensemble, why_not_packable
from optolab.training.trainer import train

from .conftest import fewshot_protocol, max_metrics_diff

# Batched matrix products sum in another order than the solo run's, so numbers agree to float32
# rounding, not bit for bit. Measured over 60 steps: at most 6e-7 for every clamp kind below.
TOLERANCE = 1e-5

CLAMPS = {
    "none": [],
    "set+ablate": [{"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [0], "to": "previous_token"},
                   {"kind": "ablate", "site": "blocks.1.attn.hook_v", "heads": [1, 2]}],
    "perfect_match": [{"kind": "set", "site": "blocks.1.attn.hook_pattern", "heads": [0], "to": "perfect_match",
                       "window": {"start": 0, "stop": 30, "unit": "steps"}}],
    "layer_clamp (3 passes)": [{"kind": "layer_clamp", "layer": 0, "copy_head": 1}],
    "perfect_copy (2 passes)": [{"kind": "perfect_copy", "layer": 1, "head": 0}],
    "ablate hook_result (mean)": [{"kind": "ablate", "site": "blocks.1.attn.hook_result", "heads": [1], "how": "mean"}],
    "scale+stop_gradient": [{"kind": "scale", "site": "blocks.0.hook_resid_post", "factor": 0.5},
                            {"kind": "stop_gradient", "site": "blocks.0.attn.hook_z", "heads": [2]}],
}


def _members(clamps, seeds=(0, 1, 2), **train):
    out = []
    for s in seeds:
        data = fewshot_protocol(steps=60, **train)
        data.update(name=f"m{s}", clamps=copy.deepcopy(clamps), seeds={"init": s, "data": s, "eval": 1})
        out.append(validate_protocol(data))
    return out


# One member per condition, chosen so the union has every pass kind: a clean pass (preserve), a
# shifted pass alone (layer clamp with a copy head), shifted + main, a main-pass copy head, a
# windowed clamp (the union changes mid-run), and a member with no clamp at all.
MIXED = {
    "none": [],
    "set+ablate": CLAMPS["set+ablate"],
    "perfect_match (window)": CLAMPS["perfect_match"],
    "layer_clamp+copy (shifted pass only)": CLAMPS["layer_clamp (3 passes)"],
    "layer_clamp (shifted + main)": [{"kind": "layer_clamp", "layer": 0},
                                     {"kind": "ablate", "site": "blocks.1.attn.hook_v", "heads": [0]}],
    "preserve+perfect_copy (clean + main)": [{"kind": "preserve", "site": "blocks.0.attn.hook_pattern"},
                                             {"kind": "ablate", "site": "blocks.0.attn.hook_v", "heads": [1]},
                                             CLAMPS["perfect_copy (2 passes)"][0]],
    "scale+stop_gradient": CLAMPS["scale+stop_gradient"],
}


@pytest.fixture(scope="module")
def mixed_solo(tmp_path_factory):
    """The MIXED members, each trained alone (eager, nnsight): the reference for both backends."""
    root = tmp_path_factory.mktemp("mixed_solo")
    # with weight decay: members whose layer clamp cuts block 0 off their loss must leave it as
    # their solo runs do (no update at all), while the other members' block 0 learns
    protocols = [_members(c, seeds=(i,), weight_decay=0.05)[0] for i, c in enumerate(MIXED.values())]
    for i, p in enumerate(protocols):
        train(p, root / f"solo{i}", progress=False)
    return protocols, root


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_members_of_mixed_conditions_each_equal_their_run_alone(mixed_solo, tmp_path, compiled, monkeypatch):
    import optolab.core.device as device

    solo, root = mixed_solo
    # compiled: `compile: auto` with the threshold between one member's steps and the packed job's,
    # so the ensemble compiles where each run alone would not (meta.json must say what ran)
    steps = solo[0].train.total_steps
    monkeypatch.setattr(device, "AUTO_COMPILE_STEPS", steps * len(solo) if compiled else device.AUTO_COMPILE_STEPS)
    protocols = [validate_protocol({**p.resolved(), "train": {**p.resolved()["train"],
                                                              "compile": "auto" if compiled else False}})
                 for p in solo]
    assert device.decide_compile(protocols[0].train, torch.device("cpu")) is False
    assert len({pack_key(p) for p in protocols}) == 1
    assert len({condition_key(p) for p in protocols}) == len(MIXED)
    train_ensemble(protocols, [tmp_path / f"ens{i}" for i in range(len(protocols))])
    for i, name in enumerate(MIXED):
        assert max_metrics_diff(tmp_path / f"ens{i}", root / f"solo{i}") < TOLERANCE, name
        segment = json.loads((tmp_path / f"ens{i}" / "meta.json").read_text())["segments"][-1]
        assert segment["compiled"] is compiled, name


@pytest.mark.numerics
@pytest.mark.parametrize("kind", list(CLAMPS))
def test_each_member_equals_its_run_alone(kind, tmp_path):
    protocols = _members(CLAMPS[kind])
    train_ensemble(protocols, [tmp_path / f"ens{i}" for i in range(3)])
    for i, p in enumerate(protocols):
        train(p, tmp_path / f"solo{i}", progress=False)
        assert max_metrics_diff(tmp_path / f"ens{i}", tmp_path / f"solo{i}") < TOLERANCE
        assert (tmp_path / f"ens{i}" / "summary.json").is_file()
        assert sorted(p.name for p in (tmp_path / f"ens{i}" / "checkpoints").glob("*.json")) == \
            sorted(p.name for p in (tmp_path / f"solo{i}" / "checkpoints").glob("*.json"))


@pytest.mark.parametrize("mixed", [False, True], ids=["seeds", "mixed conditions"])
def test_an_interrupted_ensemble_resumes_from_its_members_checkpoints(tmp_path, mixed):
    protocols = _members(CLAMPS["set+ablate"], seeds=(3, 4))
    if mixed:  # the second member: a layer clamp (block 0 cut off its loss) and weight decay
        protocols = [_members(c, seeds=(s,), weight_decay=0.05)[0]
                     for s, c in [(3, CLAMPS["set+ablate"]), (4, MIXED["layer_clamp (shifted + main)"])]]
    outs = [tmp_path / "a", tmp_path / "b"]
    train_ensemble(protocols, outs, stop_after=20)
    assert not (outs[0] / "summary.json").exists()
    train_ensemble(protocols, outs)
    for i, p in enumerate(protocols):
        train(p, tmp_path / f"solo{i}", progress=False)
        assert max_metrics_diff(outs[i], tmp_path / f"solo{i}") < TOLERANCE


def test_packing_never_mixes_incompatible_runs():
    a, b = _members([], seeds=(0, 1))
    assert pack_key(a) == pack_key(b)  # seeds and names may differ
    (lr,) = _members([], seeds=(0,), lr=3e-3)
    assert pack_key(lr) != pack_key(a)
    (clamped,) = _members(CLAMPS["set+ablate"], seeds=(0,))
    assert pack_key(clamped) == pack_key(a)  # another condition of the same model: packable
    assert condition_key(clamped) != condition_key(a) and condition_key(b) == condition_key(a)
    (wider,) = _members([], seeds=(0,))
    wider = validate_protocol({**wider.resolved(), "model": {**wider.resolved()["model"], "n_layers": 3}})
    assert pack_key(wider) != pack_key(a)  # another model shape never packs
    other_eval = validate_protocol({**a.resolved(), "seeds": {"init": 0, "data": 0, "eval": 7}})
    assert pack_key(other_eval) != pack_key(a)  # a different eval set is a different measurement
    (clipped,) = _members([], seeds=(0,), grad_clip=1.0)
    assert "grad_clip" in why_not_packable(clipped)
    (frozen,) = _members([{"kind": "freeze", "param": "blocks.0.attn.W_Q"}], seeds=(0,))
    assert "freeze" in why_not_packable(frozen)
    with pytest.raises(ValueError, match="share everything"):
        train_ensemble([a, lr], ["x", "y"])
    with pytest.raises(ValueError, match="freeze"):
        train_ensemble([a, frozen], ["x", "y"])


def test_pass_signatures_name_the_passes_a_union_would_run():
    def sig(clamps):
        return pass_signature(_members(clamps, seeds=(0,))[0].clamps)

    assert sig([]) == sig(CLAMPS["set+ablate"]) == sig(CLAMPS["perfect_copy (2 passes)"]) == ("main",)
    assert sig(CLAMPS["layer_clamp (3 passes)"]) == ("shifted",)
    assert sig(MIXED["layer_clamp (shifted + main)"]) == ("shifted", "main")
    assert sig(MIXED["preserve+perfect_copy (clean + main)"]) == ("clean", "main")
    windowed = [{**CLAMPS["layer_clamp (3 passes)"][0], "window": {"start": 0, "stop": 30, "unit": "steps"}}]
    assert sig(windowed) == ("shifted", "main")  # after its window, the main pass runs again


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_member_that_diverges_stops_alone(tmp_path, monkeypatch, compiled):
    from optolab.core.errors import RunFailed
    from optolab.tasks.fewshot import FewshotTask

    original = FewshotTask.train_batch

    def poisoned(self, seed, step, batch_size):
        batch = original(self, seed, step, batch_size)
        if seed == 1 and step >= 25:
            batch.inputs[0].fill_(float("nan"))
        return batch

    monkeypatch.setattr(FewshotTask, "train_batch", poisoned)
    protocols = _members([], seeds=(0, 1), compile=compiled)
    results = train_ensemble(protocols, [tmp_path / "a", tmp_path / "b"])
    assert isinstance(results[1], RunFailed) and "step 25" in str(results[1])
    assert results[0]["status"] == "finished"
    monkeypatch.setattr(FewshotTask, "train_batch", original)
    train(protocols[0], tmp_path / "solo", progress=False)
    assert max_metrics_diff(tmp_path / "a", tmp_path / "solo") < TOLERANCE  # the healthy member is unaffected


def test_a_compiled_mixed_ensemble_evaluates_right_when_no_clamp_acts(tmp_path):
    """After the window of the only windowed condition, nothing acts: the union eval program is
    the plain one that saves what the measures read, for every member."""
    protocols = [_members(c, seeds=(i,), compile=True)[0]
                 for i, c in enumerate([[], CLAMPS["perfect_match"]])]
    train_ensemble(protocols, [tmp_path / f"ens{i}" for i in range(2)])
    for i, p in enumerate(protocols):
        train(validate_protocol({**p.resolved(), "train": {**p.resolved()["train"], "compile": False}}),
              tmp_path / f"solo{i}", progress=False)
        assert max_metrics_diff(tmp_path / f"ens{i}", tmp_path / f"solo{i}") < TOLERANCE


def test_a_clamp_every_condition_has_acts_once_and_members_still_equal_their_runs_alone(tmp_path):
    from optolab.clamps.union import Conditions
    from optolab.tasks import make_task
    from optolab.training.trainer import make_forward

    ablate = {"kind": "ablate", "site": "blocks.1.attn.hook_v", "heads": [1, 2, 3]}  # T4's single-head model
    conditions = [[ablate], [ablate, *CLAMPS["perfect_copy (2 passes)"]], [ablate, *CLAMPS["layer_clamp (3 passes)"]],
                  [ablate, {"kind": "scale", "site": "blocks.0.hook_resid_post", "factor": 0.5}]]
    protocols = [_members(c, seeds=(i,))[0] for i, c in enumerate(conditions)]
    task = make_task(protocols[0].task)
    cfg = protocols[0].model_config_for(task)
    union = Conditions([make_forward(p, task, cfg) for p in protocols], range(4)).program(0)
    at_v = [len(ops) for p in union.passes for site, ops in p.steps if site == ablate["site"]]
    assert [p.name for p in union.passes] == ["shifted", "main"] and at_v == [1, 1]  # once per pass, not 4 times
    # a common clamp at a site another condition also writes keeps one gated copy per condition
    clash = [[ablate], [ablate, {"kind": "scale", "site": "blocks.1.attn.hook_v", "heads": [0], "factor": 2.0}]]
    clashing = [_members(c, seeds=(i,))[0] for i, c in enumerate(clash)]
    union = Conditions([make_forward(p, task, cfg) for p in clashing], range(2)).program(0)
    assert [len(ops) for p in union.passes for site, ops in p.steps if site == ablate["site"]] == [3]
    outs = [tmp_path / f"ens{i}" for i in range(6)]
    train_ensemble(protocols + clashing, outs)
    for i, p in enumerate(protocols + clashing):
        train(p, tmp_path / f"solo{i}", progress=False)
        assert max_metrics_diff(outs[i], tmp_path / f"solo{i}") < TOLERANCE, i


def test_members_with_one_data_seed_each_equal_their_run_alone(tmp_path):
    """A condition sweep packs runs of one seed together; they share each step's batch
    (:mod:`optolab.training.batches`) and each still equals its run alone."""
    members = _members([], seeds=(0,)) + _members(CLAMPS["set+ablate"], seeds=(0,))
    train_ensemble(members, [tmp_path / "e0", tmp_path / "e1"])
    for i, p in enumerate(members):
        train(p, tmp_path / f"solo{i}", progress=False)
        assert max_metrics_diff(tmp_path / f"e{i}", tmp_path / f"solo{i}") < TOLERANCE
