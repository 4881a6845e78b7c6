"""The randomness channel and the ``noise`` clamp kind: deterministic, resumable, and the same
numbers on the nnsight, hooks, compiled and ensemble paths."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import vmap

from optolab.clamps.rng import call_key, normal
from optolab.core.errors import OptolabError
from optolab.protocol.loader import validate_protocol
from optolab.training.ensemble import train_ensemble
from optolab.training.trainer import train

from .conftest import fewshot_protocol, max_metrics_diff

# as tests/test_compiled.py and tests/test_ensemble.py: float rounding only
TOLERANCE = 1e-5
NOISE = [{"kind": "noise", "site": "blocks.0.hook_resid_post", "sigma": 0.3},
         {"kind": "noise", "site": "pattern1", "heads": [1], "sigma": 0.5, "relative": True,
          "window": {"start": 5, "stop": 30, "unit": "steps"}}]


def _protocol(clamps=NOISE, seed: int = 0, **train_fields) -> object:
    data = fewshot_protocol(steps=40, **train_fields)
    data.update(name=f"n{seed}", clamps=copy.deepcopy(clamps), seeds={"init": seed, "data": seed, "eval": 1})
    return validate_protocol(data)


def test_the_same_key_gives_the_same_numbers_and_others_differ():
    k = call_key(0, 0, 7, True)
    a, b = normal(k, 3, (4, 5)), normal(k, 3, (4, 5))
    assert torch.equal(a, b)
    assert not torch.equal(a, normal(k, 4, (4, 5)))  # another clamp
    assert not torch.equal(a, normal(call_key(0, 0, 8, True), 3, (4, 5)))  # another step
    assert not torch.equal(a, normal(call_key(0, 0, 7, False), 3, (4, 5)))  # evaluation
    assert not torch.equal(a, normal(call_key(1, 1, 7, True), 3, (4, 5)))  # another run


def test_the_numbers_are_standard_normal():
    z = normal(call_key(3, 4, 5, True), 0, (200_000,))
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1) < 0.01
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.01  # the normal's 1-sigma mass
    assert torch.isfinite(z).all()


def test_vmapped_keys_draw_each_members_own_numbers():
    keys = torch.stack([call_key(s, s, 2, True) for s in range(3)])
    batched = vmap(lambda k: normal(k, 1, (6, 2)))(keys)
    for s in range(3):
        assert torch.equal(batched[s], normal(keys[s], 1, (6, 2)))


def test_noise_changes_training_and_reruns_repeat_exactly(tmp_path):
    a, b, plain = tmp_path / "a", tmp_path / "b", tmp_path / "plain"
    train(_protocol(), a, progress=False)
    train(_protocol(), b, progress=False)
    train(_protocol(clamps=[]), plain, progress=False)
    assert max_metrics_diff(a, b) == 0.0
    assert max_metrics_diff(a, plain) > 1e-3


@pytest.mark.numerics
def test_hooks_and_nnsight_draw_the_same_noise_bit_for_bit(tmp_path):
    train(_protocol(clamp_engine="nnsight"), tmp_path / "nn", progress=False)
    train(_protocol(clamp_engine="hooks"), tmp_path / "hooks", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "hooks") == 0.0


def test_a_resumed_noisy_run_repeats_the_uninterrupted_one(tmp_path):
    train(_protocol(), tmp_path / "whole", progress=False)
    train(_protocol(), tmp_path / "cut", progress=False, stop_after=20)
    train(_protocol(), tmp_path / "cut", progress=False)
    assert max_metrics_diff(tmp_path / "whole", tmp_path / "cut") == 0.0


@pytest.mark.numerics
def test_compiled_noise_equals_the_nnsight_run(tmp_path):
    train(_protocol(), tmp_path / "eager", progress=False)
    train(_protocol(compile=True), tmp_path / "compiled", progress=False)
    assert max_metrics_diff(tmp_path / "eager", tmp_path / "compiled") < TOLERANCE


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ensemble_members_draw_their_solo_runs_noise(tmp_path, compiled):
    # two seeds of the noisy condition and one member without clamps: a union of conditions
    protocols = [_protocol(seed=0, compile=compiled), _protocol(seed=1, compile=compiled),
                 _protocol(clamps=[], seed=2, compile=compiled)]
    outs = [tmp_path / f"member{i}" for i in range(3)]
    train_ensemble(protocols, outs)
    for i, p in enumerate(protocols):
        solo = tmp_path / f"solo{i}"
        train(_protocol(clamps=p.resolved()["clamps"], seed=i), solo, progress=False)  # eager nnsight
        assert max_metrics_diff(outs[i], solo) < TOLERANCE


def test_relative_noise_scales_with_the_activation():
    from optolab.clamps.values import PassContext
    from optolab.protocol.schema import Protocol

    p = _protocol(clamps=[{"kind": "noise", "site": "resid_post0", "sigma": 0.1, "relative": True}])
    plan = p.clamp_plan(*_task_cfg(p))
    c = plan.clamps[0]
    op = c.spec.op(c, plan.exemplar_label)
    ctx = PassContext(batch=None, key=call_key(0, 0, 0, True))
    x = torch.randn(4, 5, 16)
    small, big = op(x, ctx) - x, op(100 * x, ctx) - 100 * x
    torch.testing.assert_close(big, 100 * small, rtol=1e-4, atol=1e-5)
    assert isinstance(p, Protocol)


def _task_cfg(p):
    from optolab.tasks import make_task

    task = make_task(p.task)
    return task, p.model_config_for(task)


@pytest.mark.parametrize("clamp, field", [
    ({"kind": "noise", "site": "v0", "sigma": 0.0}, "clamps.0.sigma"),
    ({"kind": "noise", "site": "v0", "sigma": 0.1, "relative": "yes"}, "clamps.0.relative"),
    ({"kind": "noise", "site": "v0"}, "clamps.0.sigma"),
    ({"kind": "noise", "site": "v9", "sigma": 0.1}, "clamps.0.site"),
])
def test_bad_noise_is_one_clear_error(clamp, field):
    with pytest.raises(OptolabError) as e:
        _protocol(clamps=[clamp])
    assert field in str(e.value)
    assert "\n" not in str(e.value)
