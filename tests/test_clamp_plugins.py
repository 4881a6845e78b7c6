"""A clamp kind defined outside optolab (docs/clamps.md's example) validates, is described,
trains and resumes, by ``kind: package.module:Class`` and by entry point."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from optolab.clamps import registry
from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.protocol.loader import load_protocol, protocol_from_resolved, validate_protocol
from optolab.training.ensemble import train_ensemble
from optolab.training.trainer import train

from .conftest import ROOT, fewshot_protocol, max_metrics_diff, write_protocol


DOC_MODULES = ("myclamps", "myjitter", "myfade", "mypaths")  # the page's examples, by their first line
TOLERANCE = 1e-5  # as tests/test_noise.py: float rounding only


def _docs_module(name: str) -> str:
    """The python block of docs/clamps.md that starts with ``# <name>.py``."""
    section = (ROOT / "docs" / "clamps.md").read_text().split("## Writing your own clamp kind", 1)[1]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    found = [b for b in blocks if b.startswith(f"# {name}.py\n")]
    assert len(found) == 1, name
    return found[0]


@pytest.fixture
def myclamps(tmp_path, monkeypatch):
    for name in DOC_MODULES:
        (tmp_path / f"{name}.py").write_text(_docs_module(name))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in DOC_MODULES:
        sys.modules.pop(name, None)


def _data(kind: str, **extra) -> dict:
    data = fewshot_protocol(steps=20)
    data["clamps"] = [{"kind": kind, "site": "resid_post0", "limit": 0.05, **extra}]
    return data


def test_a_kind_by_path_validates_trains_and_resumes(myclamps, tmp_path, capsys):
    path = write_protocol(tmp_path, _data("myclamps:Clip"))
    assert main(["validate", str(path)]) == 0
    assert "is clipped to ±0.05" in capsys.readouterr().out
    run = tmp_path / "run"
    train(load_protocol(path), run, progress=False, stop_after=10)
    train(load_protocol(path), run, progress=False)  # resumes: the recorded kind reloads
    again = protocol_from_resolved(run / "protocol.yaml")
    assert again.clamps[0].kind == "myclamps:Clip"
    whole = tmp_path / "whole"
    train(load_protocol(path), whole, progress=False)
    for a, b in zip(sorted((run / "checkpoints").glob("*.safetensors")), sorted((whole / "checkpoints").glob("*.safetensors"))):
        assert a.read_bytes() == b.read_bytes()


def test_the_kind_acts(myclamps):
    from optolab.model.transformer import build_model
    from optolab.tasks import make_task
    from optolab.training.trainer import make_forward

    p = validate_protocol(_data("myclamps:Clip"))
    task = make_task(p.task)
    cfg = p.model_config_for(task)
    _, saved = make_forward(p, task, cfg)(build_model(cfg, 0), task.train_batch(0, 0, 4), step=0, training=True,
                                          save=["blocks.0.hook_resid_post"])
    assert saved["blocks.0.hook_resid_post"].abs().max() <= 0.05 + 1e-7


def test_its_own_checks_name_the_field(myclamps):
    data = _data("myclamps:Clip")
    data["clamps"][0]["site"] = "pattern0"
    with pytest.raises(OptolabError, match=r"clamps\.0\.site.*clip the scores"):
        validate_protocol(data)
    with pytest.raises(OptolabError, match=r"clamps\.0\.limit"):
        validate_protocol(_data("myclamps:Clip", limit=-1.0))


def test_a_kind_by_entry_point(myclamps, monkeypatch):
    ep = importlib.metadata.EntryPoint(name="clip", value="myclamps:Clip", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {"clip": ep})
    p = validate_protocol(_data("clip"))
    assert type(p.clamps[0]).__name__ == "Clip"
    assert "clip" in registry.known_kinds()


@pytest.mark.parametrize("kind, message", [
    ("nosuchmodule:Clip", "cannot import module 'nosuchmodule'"),
    ("myclamps:Nope", "has no 'Nope'"),
    ("torch:Tensor", "is not a clamp kind"),
    ("zap", "set 'kind' to one of"),
])
def test_bad_kinds_are_one_line(myclamps, kind, message):
    with pytest.raises(OptolabError) as e:
        validate_protocol(_data(kind))
    assert message in str(e.value) and "clamps.0" in str(e.value)
    assert "\n" not in str(e.value)


def test_every_builtin_kind_is_one_module():
    import optolab.clamps.kinds as kinds

    modules = {p.stem for p in (ROOT / "optolab" / "clamps" / "kinds").glob("*.py") if p.stem != "__init__"}
    assert len(modules) == len(registry.BUILTIN)
    for kind, cls in registry.BUILTIN.items():
        assert cls.__module__.startswith(kinds.__name__ + "."), kind


# --- a kind that draws random numbers, and sets nothing about it (docs: myjitter.py) ----------

JITTER = {"kind": "myjitter:Jitter", "site": "resid_post0", "sigma": 0.3}
OTHER = {"kind": "ablate", "site": "v1", "heads": [0]}


def _seeded(clamps, seed: int = 0, steps: int = 30, **train_fields):
    data = fewshot_protocol(steps=steps, **train_fields)
    data.update(name=f"j{seed}", clamps=clamps, seeds={"init": seed, "data": seed, "eval": 1})
    return validate_protocol(data)


def _plan(p):
    from optolab.tasks import make_task

    task = make_task(p.task)
    return p.clamp_plan(task, p.model_config_for(task))


def test_the_planner_finds_a_kind_that_draws(myclamps):
    import myjitter

    assert "shareable" not in vars(myjitter.Jitter) and myjitter.Jitter.stochastic is None  # it says nothing
    jitter, ablate = _plan(_seeded([JITTER, OTHER])).clamps
    assert jitter.draws and not jitter.shareable
    assert not ablate.draws and ablate.shareable
    noise = _plan(_seeded([{"kind": "noise", "site": "v0", "sigma": 0.1}])).clamps[0]
    assert noise.draws
    ramped = _plan(_seeded([{"kind": "ramp", "clamp": {"kind": "noise", "site": "v0", "sigma": 0.1}}])).clamps[0]
    assert ramped.draws and not ramped.shareable  # a ramp is shareable, the noise it ramps is not
    from optolab.clamps.describe import describe_clamp

    plan = _plan(_seeded([JITTER, OTHER]))
    said = [describe_clamp(c, plan, 8) for c in plan.clamps]  # validate shows the probe's verdict
    assert "draws random numbers" in said[0] and "draws random numbers" not in said[1]


def test_a_kind_that_draws_is_never_shared_across_conditions(myclamps):
    from optolab.clamps.union import _common

    a, b = _plan(_seeded([JITTER])), _plan(_seeded([OTHER, JITTER]))  # jitter is clamp 0 in one, 1 in the other
    common, _rest = _common([a, b], [a.clamps, b.clamps])
    assert common == []
    plain = _plan(_seeded([{**OTHER, "site": "v0"}]))  # a clamp that draws nothing is shared
    assert len(_common([plain, plain], [plain.clamps, plain.clamps])[0]) == 1


def test_a_kind_that_draws_is_the_same_on_nnsight_hooks_compiled_and_resumed(myclamps, tmp_path):
    train(_seeded([OTHER, JITTER], clamp_engine="nnsight"), tmp_path / "nn", progress=False)
    train(_seeded([OTHER, JITTER], clamp_engine="hooks"), tmp_path / "hooks", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "hooks") == 0.0
    train(_seeded([OTHER, JITTER]), tmp_path / "cut", progress=False, stop_after=10)
    train(_seeded([OTHER, JITTER]), tmp_path / "cut", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "cut") == 0.0
    train(_seeded([OTHER, JITTER], compile=True), tmp_path / "compiled", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "compiled") < TOLERANCE
    train(_seeded([OTHER]), tmp_path / "plain", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "plain") > 1e-3  # the jitter acts


def test_each_condition_of_an_ensemble_draws_its_own_stream(myclamps, tmp_path):
    # the same jitter at index 0 in one condition and 1 in another (every condition has it, so a
    # union could act it once for all): shared, one condition would draw the other's numbers (max
    # metric difference 0.21 against its solo run when the probe's answer is ignored).
    # Eager: which ops a union shares does not depend on the path, and compiled ensembles draw as
    # eager ones (tests/test_noise.py)
    conditions = [[JITTER], [OTHER, JITTER], [JITTER]]
    protocols = [_seeded(c, seed=i) for i, c in enumerate(conditions)]
    outs = [tmp_path / f"member{i}" for i in range(len(protocols))]
    train_ensemble(protocols, outs)
    for i, c in enumerate(conditions):
        train(_seeded(c, seed=i), tmp_path / f"solo{i}", progress=False)  # eager nnsight
        assert max_metrics_diff(outs[i], tmp_path / f"solo{i}") < TOLERANCE


def test_a_draw_lands_on_the_device_of_the_tensor_it_fills():
    import torch

    from optolab.clamps.rng import call_key
    from optolab.clamps.values import PassContext

    ctx = PassContext(None, key=call_key(0, 0, 0, True, "meta"))  # a key on another device than the CPU
    assert ctx.normal((3, 2), 0).device.type == "meta"  # no device given: the key's (the batch's)
    x = torch.ones(2, 3, dtype=torch.float64)
    z = PassContext(None, key=call_key(0, 0, 0, True)).normal_like(x, 5)
    assert z.shape == x.shape and z.dtype == x.dtype and z.device == x.device


# --- a kind that follows a schedule (docs: myfade.py) ---------------------------------------

FADE = {"kind": "myfade:Fade", "site": "resid_post0", "to": 0.0, "window": {"start": 10, "stop": 30, "unit": "steps"}}


def test_a_scheduled_kind_reads_the_window_clock(myclamps):
    from optolab.model.transformer import build_model
    from optolab.tasks import make_task
    from optolab.training.trainer import make_forward

    p = _seeded([FADE])
    task = make_task(p.task)
    cfg = p.model_config_for(task)
    model, batch, site = build_model(cfg, 0), task.train_batch(0, 0, 4), "blocks.0.hook_resid_post"
    forward, plain = make_forward(p, task, cfg), make_forward(_seeded([]), task, cfg)
    clean = plain(model, batch, step=0, training=True, save=[site])[1][site]
    for step, factor in ((10, 1.0), (15, 0.75), (20, 0.5), (29, 0.05)):
        faded = forward(model, batch, step=step, training=True, save=[site])[1][site]
        torch_close(faded, factor * clean)


def torch_close(a, b):
    import torch

    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_scheduled_kind_is_the_same_on_every_path(myclamps, tmp_path):
    train(_seeded([FADE], clamp_engine="nnsight"), tmp_path / "nn", progress=False)
    train(_seeded([FADE], clamp_engine="hooks"), tmp_path / "hooks", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "hooks") == 0.0
    train(_seeded([FADE], compile=True), tmp_path / "compiled", progress=False)
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "compiled") < TOLERANCE
    train_ensemble([_seeded([FADE], seed=0), _seeded([], seed=1)], [tmp_path / "m0", tmp_path / "m1"])
    assert max_metrics_diff(tmp_path / "nn", tmp_path / "m0") < TOLERANCE


# --- a kind with a pass of its own (docs: mypaths.py) ---------------------------------------


def test_a_kind_declares_its_own_pass(myclamps, tmp_path):
    cut = {"kind": "mypaths:CutFrom", "site": "k1", "without": "attn_out0"}
    train(_seeded([cut], steps=20), tmp_path / "plugin", progress=False)
    train(_seeded([{"kind": "path_ablate", "site": "k1", "without": "attn_out0"}], steps=20), tmp_path / "builtin",
          progress=False)
    assert max_metrics_diff(tmp_path / "plugin", tmp_path / "builtin") == 0.0
    train(_seeded([], steps=20), tmp_path / "plain", progress=False)
    assert max_metrics_diff(tmp_path / "plugin", tmp_path / "plain") > 1e-3


def test_a_pass_given_two_positions_is_refused(myclamps):
    import mypaths

    class Elsewhere(mypaths.CutFrom):
        KIND = "cut_elsewhere"
        needs = {"cut": 60}

    sys.modules["mypaths"].Elsewhere = Elsewhere
    cut = {"kind": "mypaths:CutFrom", "site": "k1", "without": "attn_out0"}
    with pytest.raises(OptolabError, match=r"clamps\.1\.kind.*the pass 'cut'"):
        validate_protocol({**fewshot_protocol(), "clamps": [cut, {**cut, "kind": "mypaths:Elsewhere", "site": "q1"}]})
