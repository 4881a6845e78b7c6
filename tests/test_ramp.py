"""The step in the pass context and the ``ramp`` kind that reads it: a strength schedule over a
window, the same numbers on the nnsight, hooks, compiled and ensemble paths, one compiled graph
for every step, resumable across the window, and varied by a sweep's ``dose`` design."""

from __future__ import annotations

import copy

import pytest
import torch

from optolab.clamps.rng import call_key
from optolab.clamps.values import PassContext, call_inputs
from optolab.core.errors import OptolabError
from optolab.protocol.loader import protocol_from_resolved, validate_protocol
from optolab.training.ensemble import train_ensemble
from optolab.training.trainer import train

from .conftest import fewshot_protocol, max_metrics_diff

TOLERANCE = 1e-5  # as tests/test_noise.py: float rounding only
RAMP = [{"kind": "ramp", "clamp": {"kind": "ablate", "site": "v0", "heads": [1, 2]},
         "window": {"start": 5, "stop": 35, "unit": "steps"}},
        {"kind": "ramp", "shape": "steps", "levels": 3, "begin": 1.0, "end": 0.25,
         "clamp": {"kind": "set", "site": "pattern1", "heads": [0], "to": "previous_token"},
         "window": {"start": 10, "stop": 40, "unit": "steps"}}]


def _protocol(clamps=RAMP, seed: int = 0, **train_fields):
    data = fewshot_protocol(steps=40, **train_fields)
    data.update(name=f"r{seed}", clamps=copy.deepcopy(clamps), seeds={"init": seed, "data": seed, "eval": 1})
    return validate_protocol(data)


def _strengths(c, steps) -> list[float]:
    s = c.spec.strength(c)
    return [s(PassContext(None, **call_inputs(call_key(0, 0, t, True), t))).item() for t in steps]


def test_the_strength_follows_the_shape_over_the_window():
    plan = _protocol().clamp_plan(*_task_cfg(_protocol()))
    linear, steps = plan.clamps
    assert (linear.when.start, linear.when.stop) == (5, 35)
    assert _strengths(linear, [5, 20, 34, 35]) == pytest.approx([0.0, 0.5, 29 / 30, 1.0])
    # 3 levels over [10, 40): 10 steps each, exact at the boundaries (integer arithmetic)
    got = _strengths(steps, [10, 19, 20, 29, 30, 39, 40])
    assert got == pytest.approx([1.0, 1.0, 0.625, 0.625, 0.25, 0.25, 0.25])


def test_a_ramp_is_between_no_clamp_and_the_full_clamp():
    from optolab.model.transformer import build_model
    from optolab.training.trainer import make_forward

    half = [{**RAMP[0], "begin": 0.5, "end": 0.5}]
    p = _protocol(half)
    task, cfg = _task_cfg(p)
    model, batch = build_model(cfg, 0), task.train_batch(0, 0, 4)
    site = "blocks.0.attn.hook_v"

    def v(clamps):
        forward = make_forward(_protocol(clamps), task, cfg)
        return forward(model, batch, step=10, training=True, save=[site])[1][site]

    full, none, ramped = v([{**RAMP[0]["clamp"], "window": RAMP[0]["window"]}]), v([]), v(half)
    torch.testing.assert_close(ramped, 0.5 * none + 0.5 * full)
    assert full[:, :, 1:3].abs().max() == 0 and none[:, :, 1:3].abs().max() > 0


def test_ramped_scores_keep_their_masked_keys():
    p = _protocol([{"kind": "ramp", "begin": 0.3, "end": 0.3, "clamp": {"kind": "scale", "site": "scores1",
                                                                       "factor": 2.0}}])
    plan = p.clamp_plan(*_task_cfg(p))
    c = plan.clamps[0]
    op = c.spec.op(c, plan.exemplar_label)
    x = torch.randn(2, 4, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    y = op(x, PassContext(None, **call_inputs(call_key(0, 0, 3, True), 3)))
    assert torch.equal(torch.isinf(y), torch.isinf(x)) and not torch.isnan(y).any()
    torch.testing.assert_close(y[torch.isfinite(x)], 1.3 * x[torch.isfinite(x)])


def test_a_ramped_stop_gradient_passes_the_rest_of_the_gradient():
    p = _protocol([{"kind": "ramp", "begin": 0.25, "end": 0.25, "clamp": {"kind": "stop_gradient", "site": "v0"}}])
    plan = p.clamp_plan(*_task_cfg(p))
    c = plan.clamps[0]
    x = torch.randn(2, 5, 4, 4, requires_grad=True)
    y = c.spec.op(c, plan.exemplar_label)(x, PassContext(None, **call_inputs(call_key(0, 0, 3, True), 3)))
    y.sum().backward()
    assert torch.equal(y, x.detach())
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.75))


def test_a_ramp_changes_training_and_reruns_repeat_exactly(tmp_path):
    train(_protocol(), tmp_path / "a", progress=False)
    train(_protocol(), tmp_path / "b", progress=False)
    train(_protocol(clamps=[]), tmp_path / "plain", progress=False)
    assert max_metrics_diff(tmp_path / "a", tmp_path / "b") == 0.0
    assert max_metrics_diff(tmp_path / "a", tmp_path / "plain") > 1e-3


def test_hooks_and_nnsight_ramp_bit_for_bit(tmp_path):
    train(_protocol(clamp_engine="nnsight"), tmp_path / "nn", progress=False)
    train(_protocol(clamp_engine="hooks"), tmp_path / "hooks", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "hooks") == 0.0


def test_a_run_resumed_inside_the_window_repeats_the_uninterrupted_one(tmp_path):
    train(_protocol(), tmp_path / "whole", progress=False)
    train(_protocol(), tmp_path / "cut", progress=False, stop_after=20)  # both ramps half-way
    resumed = protocol_from_resolved(tmp_path / "cut" / "protocol.yaml")  # the recorded ramp reloads
    train(resumed, tmp_path / "cut", progress=False)
    assert max_metrics_diff(tmp_path / "whole", tmp_path / "cut") == 0.0
    for a, b in zip(sorted((tmp_path / "whole" / "checkpoints").glob("*.safetensors")),
                    sorted((tmp_path / "cut" / "checkpoints").glob("*.safetensors"))):
        assert a.read_bytes() == b.read_bytes()


def _graphs(protocol, out) -> int:
    """Graphs torch.compile built for a run (its caches are cleared when a compiled run starts)."""
    from torch._dynamo.utils import counters

    counters.clear()
    train(protocol, out, progress=False)
    return counters["stats"]["unique_graphs"]


def test_compiled_ramp_equals_nnsight_and_compiles_once_for_every_step(tmp_path):
    train(_protocol(), tmp_path / "eager", progress=False)
    ramped = _graphs(_protocol(compile=True), tmp_path / "compiled")
    assert max_metrics_diff(tmp_path / "eager", tmp_path / "compiled") < TOLERANCE
    # the same clamps at full strength over the same windows: the ramps' 30 steps add no graph
    fixed = [{**r["clamp"], "window": r["window"]} for r in RAMP]
    assert ramped == _graphs(_protocol(fixed, compile=True), tmp_path / "fixed")
    assert ramped < 20


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ensemble_members_ramp_as_their_solo_runs(tmp_path, compiled):
    # two seeds of the ramps, and the ramps after an ablation: a union of two conditions that acts
    # the ramps once for both (they draw nothing, at sites the ablation leaves alone)
    other = [{"kind": "ablate", "site": "v1", "heads": [3]}, *RAMP]
    protocols = [_protocol(seed=0, compile=compiled), _protocol(seed=1, compile=compiled),
                 _protocol(clamps=other, seed=2, compile=compiled)]
    from optolab.clamps.union import _common

    plans = [protocols[0].clamp_plan(*_task_cfg(protocols[0])), protocols[2].clamp_plan(*_task_cfg(protocols[2]))]
    assert len(_common(plans, [plans[0].clamps, plans[1].clamps])[0]) == 2
    outs = [tmp_path / f"member{i}" for i in range(3)]
    train_ensemble(protocols, outs)
    for i, p in enumerate(protocols):
        solo = tmp_path / f"solo{i}"
        train(_protocol(clamps=p.resolved()["clamps"], seed=i), solo, progress=False)  # eager nnsight
        assert max_metrics_diff(outs[i], solo) < TOLERANCE


def test_a_dose_design_varies_the_ramps_shape(tmp_path):
    from optolab.experiments.sweep import load_sweep

    from .test_designs import _clamps, _sweep

    design = {"kind": "dose", "reference": "none", "clamp": {k: v for k, v in RAMP[0].items() if k != "window"},
              "field": "shape", "values": ["linear", "steps"]}
    spec, runs = load_sweep(_sweep(tmp_path, design))
    assert [c.name for c in spec.conditions] == ["none", "dose_linear", "dose_steps"]
    assert [_clamps(runs[f"dose_{v}_s0"])[0]["shape"] for v in ("linear", "steps")] == ["linear", "steps"]
    inner = {**design, "field": "clamp.how", "values": ["zero", "mean"]}  # the ramped clamp's own field
    _, runs = load_sweep(_sweep(tmp_path, inner))
    assert _clamps(runs["dose_mean_s0"])[0]["clamp"]["how"] == "mean"


def test_validate_describes_the_ramp(tmp_path, capsys):
    from optolab.cli import main

    from .conftest import write_protocol

    data = fewshot_protocol(steps=40)
    data["clamps"] = RAMP
    assert main(["validate", str(write_protocol(tmp_path, data))]) == 0
    out = capsys.readouterr().out
    assert "is set to zero (ablated), at a strength that goes linearly from 0 to 1" in out
    assert "in 3 equal steps from 1 to 0.25" in out


@pytest.mark.parametrize("clamp, field", [
    ({**RAMP[0], "clamp": {**RAMP[0]["clamp"], "window": {"start": 0}}}, "clamps.0.clamp.window"),
    ({**RAMP[0], "clamp": {"kind": "preserve", "site": "v1"}}, "clamps.0.clamp.kind"),
    ({**RAMP[0], "clamp": {"kind": "ablate", "site": "v9"}}, "clamps.0.clamp.site"),
    ({**RAMP[0], "clamp": {"kind": "ablate", "site": "v0", "hedas": [1]}}, "clamps.0.clamp.hedas"),
    ({**RAMP[0], "levels": 3}, "clamps.0.levels"),
    ({**RAMP[0], "end": 1.5}, "clamps.0.end"),
    ({**RAMP[0], "shape": "cosine"}, "clamps.0.shape"),
])
def test_a_bad_ramp_is_one_clear_error(clamp, field):
    with pytest.raises(OptolabError) as e:
        _protocol(clamps=[clamp])
    assert field in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def _task_cfg(p):
    from optolab.tasks import make_task

    task = make_task(p.task)
    return task, p.model_config_for(task)
