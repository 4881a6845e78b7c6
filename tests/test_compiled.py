"""The compiled path (``train.compile: true``): equal to the nnsight path for every clamp kind (up to
float rounding), solo and in ensembles, and a resumed compiled run repeats the uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from optolab.core.errors import OptolabError
from optolab.model.transformer import build_model
from optolab.protocol.loader import validate_protocol
from optolab.tasks import make_task
from optolab.training.compiled_step import CompiledStep, adam_, ensure_state
from optolab.training.ensemble import train_ensemble
from optolab.training.trainer import make_forward, make_optimizer, make_update, train

from .conftest import fewshot_protocol, max_metrics_diff

# The compiler fuses and reorders float sums, so numbers agree to rounding, not bit for bit.
# Measured over 40 steps at lr 1e-3: at most 1e-6 on any metric, for every group below.
TOLERANCE = 1e-5
STEPS = 40


def _groups(tmp_path) -> dict[str, list[dict]]:
    donor = tmp_path / "donor"
    train(validate_protocol(fewshot_protocol(steps=2)), donor, progress=False)
    pattern = tmp_path / "pattern.safetensors"
    save_file({"p": torch.full((5, 5), 0.2)}, str(pattern))
    return {
        "none": [],
        # one pass, many site kinds; perfect_match has a window, an input of the compiled program
        # (ctx.live: tests/test_windows.py)
        "site clamps": [
            {"kind": "ablate", "site": "v1", "heads": [0], "how": "zero"},
            {"kind": "ablate", "site": "result0", "heads": [1], "how": "mean"},
            {"kind": "ablate", "site": "z1", "heads": [3], "how": "resample", "positions": "query"},
            {"kind": "set", "site": "pattern0", "heads": [1], "to": "previous_token", "strength": 0.9},
            {"kind": "set", "site": "pattern1", "heads": [2], "to": "perfect_match",
             "window": {"start": 10, "stop": 25, "unit": "steps"}},
            {"kind": "set", "site": "pattern1", "heads": [0], "to": "file", "file": str(pattern)},
            {"kind": "set", "site": "q0", "to": "constant", "value": 0.0, "heads": [3]},
            {"kind": "stop_gradient", "site": "k1", "heads": [1, 2]},
            {"kind": "scale", "site": "scores1", "factor": 2.0},
            {"kind": "add", "site": "embed", "value": 0.1},
        ],
        # a preserve adds a pass, so its window switches programs and back (after step 25 the first
        # program's graph must be chosen again: CallKeys)
        "two passes": [{"kind": "preserve", "site": "pattern0"},
                       {"kind": "preserve", "site": "pattern1", "window": {"start": 10, "stop": 25, "unit": "steps"}},
                       {"kind": "ablate", "site": "v0", "heads": [1]},
                       {"kind": "perfect_copy", "layer": 1, "head": 3}],
        # the layer clamp cuts block 0 off the loss until step 25: no gradient, so no Adam update
        # (and no weight decay: WEIGHT_DECAY) for it in either path
        "three passes": [{"kind": "layer_clamp", "copy_head": 1, "window": {"start": 0, "stop": 25, "unit": "steps"}}],
        "graft+freeze": [{"kind": "graft", "site": "resid_post0", "source": str(donor)},
                         {"kind": "freeze", "param": "blocks.1.attn.W_K", "heads": [0]}],
    }


WEIGHT_DECAY = 0.05


def _protocol(clamps: list[dict], compiled: bool, seed: int = 0, **train):
    data = fewshot_protocol(steps=STEPS, **{"weight_decay": WEIGHT_DECAY, **train})
    data.update(name=f"c{seed}", clamps=copy.deepcopy(clamps), seeds={"init": seed, "data": seed, "eval": 1})
    data["train"]["compile"] = compiled
    return validate_protocol(data)


@pytest.mark.numerics
@pytest.mark.parametrize("group", ["none", "site clamps", "two passes", "three passes", "graft+freeze"])
def test_compiled_run_equals_the_nnsight_run(group, tmp_path):
    clamps = _groups(tmp_path)[group]
    # with a freeze (and clipping) the compiled step hands its gradients to the trainer's sequence
    extra = {"grad_clip": 0.5} if group == "graft+freeze" else {}
    ref = train(_protocol(clamps, False, **extra), tmp_path / "nnsight", progress=False)
    got = train(_protocol(clamps, True, **extra), tmp_path / "compiled", progress=False)
    assert max_metrics_diff(tmp_path / "nnsight", tmp_path / "compiled") < TOLERANCE
    for (name, a), b in zip(ref.model.named_parameters(), got.model.parameters()):
        assert torch.allclose(a, b, atol=TOLERANCE, rtol=0), name
    if group == "graft+freeze":  # the frozen head did not move in either run
        k0 = build_model(got.model.cfg, 0).blocks[1].attn.W_K.detach()[:, 0]
        assert torch.equal(got.model.blocks[1].attn.W_K.detach()[:, 0].cpu(), k0)


@pytest.mark.parametrize("group", ["site clamps", "three passes"])
def test_compiled_ensemble_members_equal_their_nnsight_runs(group, tmp_path):
    clamps = _groups(tmp_path)[group]
    members = [_protocol(clamps, True, seed=s) for s in (0, 1)]
    train_ensemble(members, [tmp_path / "e0", tmp_path / "e1"])
    for s in (0, 1):
        train(_protocol(clamps, False, seed=s), tmp_path / f"solo{s}", progress=False)
        assert max_metrics_diff(tmp_path / f"e{s}", tmp_path / f"solo{s}") < TOLERANCE


def test_a_resumed_compiled_run_repeats_the_uninterrupted_one(tmp_path):
    clamps = _groups(tmp_path)["site clamps"]
    protocol = _protocol(clamps, True)
    full = train(protocol, tmp_path / "full", progress=False)
    train(protocol, tmp_path / "cut", progress=False, stop_after=20)
    resumed = train(protocol, tmp_path / "cut", progress=False)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert full.run_dir.metrics()["value"].equals(resumed.run_dir.metrics()["value"])


def test_no_cpp_compiler_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr("optolab.core.device.shutil.which", lambda name: None)
    with pytest.raises(OptolabError) as err:
        train(_protocol([], True, device="cpu"), tmp_path / "run", progress=False)  # a GPU needs Triton instead
    assert err.value.field == "train.compile" and "train.compile: false" in err.value.fix
    assert not (tmp_path / "run").exists()


def test_the_direct_fused_adam_call_is_the_optimizers_step_bit_for_bit():
    protocol = _protocol([], False, weight_decay=0.01)
    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    ours, theirs = build_model(cfg, 0), build_model(cfg, 0)
    opt_ours, opt_theirs = make_optimizer(protocol, ours), make_optimizer(protocol, theirs)
    ensure_state(opt_ours)
    for step in range(5):
        grads = [torch.randn_like(p) for p in ours.parameters()]
        adam_(opt_ours, list(ours.parameters()), [g.clone() for g in grads])
        for p, g in zip(theirs.parameters(), grads):
            p.grad = g.clone()
        opt_theirs.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_ours.state[a][key], opt_theirs.state[b][key]), (name, key)


def test_a_non_finite_loss_leaves_a_compiled_step_without_effect():
    protocol = _protocol([{"kind": "set", "site": "pattern0", "heads": [1], "to": "previous_token"}], True)
    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    model = build_model(cfg, 0)
    optimizer = make_optimizer(protocol, model)
    update = make_update(protocol, make_forward(protocol, task, cfg), model, optimizer)
    assert isinstance(update, CompiledStep) and update.plain
    for step in range(3):
        assert torch.isfinite(update(task.train_batch(0, step, 16), step))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}
    bad = task.train_batch(0, 3, 16)
    bad.inputs[0].fill_(float("inf"))
    assert not torch.isfinite(update(bad, 3))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state[n].items()), n

