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
from optolab.training.trainer import train

from .conftest import ROOT, fewshot_protocol, write_protocol


def _docs_example() -> str:
    section = (ROOT / "docs" / "clamps.md").read_text().split("## Writing your own clamp kind", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


@pytest.fixture
def myclamps(tmp_path, monkeypatch):
    (tmp_path / "myclamps.py").write_text(_docs_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("myclamps", None)


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
