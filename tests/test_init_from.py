"""``init_from``: a run that starts from another run's checkpoint, with or without its Adam
state, on the same or another task (issue 19)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from optolab.core.errors import OptolabError
from optolab.protocol.loader import validate_protocol
from optolab.training.trainer import train

from .conftest import fewshot_protocol, write_protocol

torch.set_num_threads(1)


def _source(tmp_path):
    data = fewshot_protocol(steps=30)
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 10}}
    train(validate_protocol(data), tmp_path / "src", progress=False)
    return tmp_path / "src"


def _child(src, **init):
    data = fewshot_protocol(steps=20)
    data["name"] = "child"
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 10}}
    data["init_from"] = {"run": str(src), **init}
    return data


def test_a_run_starts_from_another_runs_weights_and_optionally_its_adam_state(tmp_path):
    src = _source(tmp_path)
    train(validate_protocol(_child(src, step=20)), tmp_path / "w", progress=False)
    start = load_file(str(tmp_path / "w" / "checkpoints" / "step_00000000.safetensors"))
    want = load_file(str(src / "checkpoints" / "step_00000020.safetensors"))
    assert all(torch.equal(start[k], want[k]) for k in want)  # step 0 of the child is the source at 20
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["init_from"]["checkpoint"].endswith("step_00000020.safetensors") and not meta["init_from"]["optimizer"]
    # with the optimizer state, Adam continues: its step count starts from the source's
    train(validate_protocol(_child(src, step=20, optimizer=True)), tmp_path / "o", progress=False)
    got = load_file(str(tmp_path / "o" / "checkpoints" / "step_00000010.optim.safetensors"))
    fresh = load_file(str(tmp_path / "w" / "checkpoints" / "step_00000010.optim.safetensors"))
    key = next(k for k in got if k.endswith("::step"))
    assert got[key].item() == 30 and fresh[key].item() == 10
    # and the two children differ only by that state
    a = load_file(str(tmp_path / "o" / "checkpoints" / "step_00000020.safetensors"))
    b = load_file(str(tmp_path / "w" / "checkpoints" / "step_00000020.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_init_from_takes_another_task_and_resumes_itself(tmp_path):
    src = _source(tmp_path)
    data = _child(src)
    data["task"] = {**data["task"], "task_seed": 7}  # another task of the same shapes
    full = train(validate_protocol(data), tmp_path / "full", progress=False)
    train(validate_protocol(data), tmp_path / "cut", progress=False, stop_after=10)
    resumed = train(validate_protocol(data), tmp_path / "cut", progress=False)  # from its own checkpoint
    assert resumed.summary["final"] == full.summary["final"]


def test_init_from_a_path_relative_to_the_protocol_and_bad_sources_are_one_line(tmp_path):
    from optolab.protocol.loader import load_protocol

    src = _source(tmp_path)
    path = write_protocol(tmp_path, {**_child(src), "init_from": {"run": "src"}}, "child.yaml")
    assert load_protocol(path).init_from.run == str(src.resolve())
    with pytest.raises(OptolabError) as e:
        train(validate_protocol(_child(src, step=15)), tmp_path / "a", progress=False)
    assert e.value.field == "init_from.step" and "no checkpoint at step 15" in str(e.value)
    other = _child(src)
    other["model"] = {**other["model"], "d_model": 32}
    with pytest.raises(OptolabError) as e:
        train(validate_protocol(other), tmp_path / "b", progress=False)
    assert e.value.field == "init_from.run" and "same model" in e.value.fix
