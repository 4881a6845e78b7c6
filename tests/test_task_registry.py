"""Adding a generator without editing optolab: dotted paths, entry points, the docs' example,
and the task commands (show, check, list), including bad task parameters."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest
import yaml

from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.protocol.loader import load_protocol, protocol_from_resolved
from optolab.tasks import BUILTIN, make_task, registry, task_class

from .conftest import ROOT, write_protocol


def _readme_blocks() -> tuple[str, str]:
    section = (ROOT / "docs" / "tasks.md").read_text().split("## Your own generator", 1)[1]
    blocks = [b.split("```", 1)[0] for b in section.split("```python", )[1:]]
    return blocks[0], blocks[1]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The docs' generator (docs/tasks.md), importable as ``mytasks``."""
    generator, _ = _readme_blocks()
    (tmp_path / "mytasks.py").write_text(generator)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mytasks", None)


def _protocol(task: dict) -> dict:
    return {"name": "user_task", "task": task, "model": {"n_layers": 1, "n_heads": 2, "d_model": 16},
            "train": {"lr": 3e-3, "batch_size": 16, "steps": 30,
                      "checkpoints": {"schedule": {"unit": "steps", "every": 30}}},
            "measures": {"schedule": {"unit": "steps", "every": 10}, "eval_sequences": 32}}


def test_readme_generator_property_test_runs(user_module):
    _, test_code = _readme_blocks()
    namespace: dict = {}
    exec(compile(test_code, "test_mytasks.py", "exec"), namespace)  # noqa: S102 - our own README
    namespace["test_two_back_keeps_the_contract"]()


def test_a_generator_by_dotted_path_trains_and_its_run_reloads(user_module, tmp_path):
    from optolab.api import run

    path = write_protocol(tmp_path, _protocol({"generator": "mytasks:TwoBackTask", "n_tokens": 8}))
    protocol = load_protocol(path)
    assert protocol.task.generator == "mytasks:TwoBackTask" and protocol.task.n_tokens == 8
    result = run(protocol, tmp_path / "run", progress=False)
    loss = result.metrics.query("metric == 'loss' and split == 'val'").sort_values("step").value
    assert loss.iloc[-1] < loss.iloc[0]  # two-back is learnable by one attention layer
    again = protocol_from_resolved(tmp_path / "run" / "protocol.yaml")
    assert again.task == protocol.task
    assert yaml.safe_load((tmp_path / "run" / "protocol.yaml").read_text())["task"]["generator"] == "mytasks:TwoBackTask"


def test_a_generator_by_entry_point(user_module, tmp_path, monkeypatch):
    ep = importlib.metadata.EntryPoint(name="two_back", value="mytasks:TwoBackTask", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {"two_back": ep})
    protocol = load_protocol(write_protocol(tmp_path, _protocol({"kind": "two_back", "seq_len": 9})))
    assert type(registry.make_task(protocol.task)).__name__ == "TwoBackTask"
    assert "two_back" in registry.known_kinds()


@pytest.mark.parametrize("task, field, words", [
    ({"generator": "no_such_module:Task"}, "task.generator", "cannot import module 'no_such_module'"),
    ({"generator": "mytasks:Missing"}, "task.generator", "has no 'Missing'"),
    ({"generator": "mytasks:TwoBackSpec"}, "task.generator", "not a Task subclass"),
    ({"generator": "not a path"}, "task.generator", "package.module:Class"),
    ({"generator": "mytasks:TwoBackTask", "kind": "fewshot"}, "task.kind", "does not match"),
    ({"generator": "mytasks:TwoBackTask", "n_tokenz": 3}, "task.n_tokenz", "did you mean 'n_tokens'"),
    ({"kind": "gausian_icl"}, "task.kind", "did you mean 'gaussian_icl'"),
    ({"kind": ["fewshot"]}, "task.kind", "must be a string"),
])
def test_bad_generators_are_refused_in_one_line(user_module, tmp_path, capsys, task, field, words):
    path = write_protocol(tmp_path, _protocol(task))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and words in err and "Fix:" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("task, field, words", [
    ({"kind": "gaussian_icl", "n_classes": 16, "n_labels": 32}, "task.n_labels", "exceeds n_classes"),
    ({"kind": "gaussian_icl", "n_classes": 100, "n_labels": 32}, "task.n_classes", "use n_classes = 96 or 128"),
    ({"kind": "gaussian_icl", "context_pairs": 8, "burstiness": 3}, "task.burstiness", "[1, 2, 4, 8]"),
    ({"kind": "gaussian_icl", "noise": -0.1}, "task.noise", ">= 0"),
    ({"kind": "bursty_classes", "n_classes": 10, "n_labels": 20}, "task.n_labels", "exceeds n_classes"),
    ({"kind": "bursty_classes", "shots": 5}, "task.shots", "does not fit"),
    ({"kind": "bursty_classes", "noise": -1}, "task.noise", ">= 0"),
    ({"kind": "markov_icl", "n_states": 9, "order": 4}, "task.order", "too many"),
    ({"kind": "markov_icl", "concentration": 0}, "task.concentration", "> 0"),
    ({"kind": "trigger_bigram", "n_tokens": 5, "n_triggers": 5}, "task.n_triggers", "below n_tokens"),
    ({"kind": "fewshot", "n_labels": 2, "context_pairs": 3}, "task.n_labels", "set n_labels >= 3"),
    ({"kind": "repeat_tokens", "seq_len": 30, "n_repeats": 3}, "model.n_ctx", "raise model.n_ctx to at least 91"),
    ({"kind": "repeat_tokens", "seq_len": 1, "n_repeats": 2, "loss_on": "repeats"}, "task.seq_len", "scores nothing"),
])
def test_impossible_task_parameters_are_refused(tmp_path, capsys, task, field, words):
    data = _protocol(task)
    if task["kind"] == "repeat_tokens":
        data["model"]["n_ctx"] = 64
    path = write_protocol(tmp_path, data)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{field}" in err and words in err and "Fix:" in err and len(err.splitlines()) == 1
    assert not out.exists()  # refused before anything is written


def test_task_file_errors_point_into_the_task_file(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("kind: gaussian_icl\nn_labels: 32\nnoise: -3\n")
    path = write_protocol(tmp_path, _protocol({"spec": "t.yaml", "n_labels": 8}))
    assert main(["validate", str(path)]) == 2
    assert "t.yaml:3: noise" in capsys.readouterr().err
    path = write_protocol(tmp_path, _protocol({"spec": "t.yaml", "noise": 0.2, "n_classes": 100}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "p.yaml" in err and "multiple of n_labels" in err


@pytest.mark.parametrize("path", sorted((ROOT / "tasks").glob("*.yaml")), ids=lambda p: p.stem)
def test_tasks_show_decodes_every_shipped_task(path, capsys):
    assert main(["tasks", "show", str(path), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Task ") and "Training batch" in out and "Split " in out


def test_tasks_check_list_and_show_from_a_protocol(capsys):
    assert main(["tasks", "check", str(ROOT / "tasks" / "reddy2023.yaml")]) == 0
    assert "checks passed" in capsys.readouterr().out
    assert main(["tasks", "list"]) == 0
    kinds = capsys.readouterr().out
    assert all(k in kinds for k in ("gaussian_icl", "bursty_classes", "markov_icl", "trigger_bigram"))
    assert main(["tasks", "show", str(ROOT / "protocols" / "quickstart.yaml")]) == 0
    assert "Task fewshot" in capsys.readouterr().out


def test_tasks_check_reports_a_missing_file_in_one_line(capsys, tmp_path):
    assert main(["tasks", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_api_validates_a_task_dict_too():
    with pytest.raises(OptolabError, match="unknown task kind"):
        registry.validate_task_spec({"kind": "nope"})


@pytest.mark.parametrize("kind", sorted(BUILTIN))
def test_every_builtin_task_refuses_an_unknown_split_naming_its_own(kind):
    task = make_task(task_class(kind).example_spec())
    with pytest.raises(KeyError) as e:
        task.eval_batch("no_such_split", 0, 4)
    assert kind in str(e.value) and all(split in str(e.value) for split in task.eval_splits)
    task.check_split(task.eval_splits[0])  # a real split passes
