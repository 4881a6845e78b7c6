"""Data schedules (``data:``, issue 19): switching the training task or mixing tasks in step
windows. Bad schedules are one clear error; the batch of a step is the right task's (or the
mixture of their rows, in the drawn proportions); a switch changes training after its step only;
resuming across a switch is bit-identical; an ensemble member equals its solo run."""

from __future__ import annotations

import copy
from typing import Literal

import pandas as pd
import pytest
import torch

from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.protocol.data_schedule import MIX_STREAM, OWN, TrainData
from optolab.protocol.loader import load_protocol, protocol_from_resolved, validate_protocol
from optolab.tasks import FewshotSpec, FewshotTask, make_task
from optolab.tasks.base import rng
from optolab.tasks.mixture import layout
from optolab.training.ensemble import pack_key, train_ensemble
from optolab.training.trainer import train

from .conftest import fewshot_protocol, write_protocol

torch.set_num_threads(1)


class NoMaskSpec(FewshotSpec):
    kind: Literal["fewshot_nomask"] = "fewshot_nomask"


class NoMaskTask(FewshotTask):
    """The fewshot task with batches that carry no match/nonmatch masks (another batch structure,
    the same model inputs and outputs)."""

    kind = "fewshot_nomask"
    Spec = NoMaskSpec

    def train_batch(self, seed, step, batch_size):
        b = super().train_batch(seed, step, batch_size)
        b.match_mask = b.nonmatch_mask = None
        return b


def _with(data: dict, steps: int = 30, **train) -> dict:
    p = fewshot_protocol(steps=steps, **train)
    p["data"] = copy.deepcopy(data)
    return p


B2 = {"tasks": {"b2": {**fewshot_protocol()["task"], "burstiness": 2}}}


def _switch(at: int = 10) -> dict:
    """Burstiness 1 (the protocol's task) until step ``at``, then burstiness 2."""
    return {**B2, "phases": [{"task": "b2", "window": {"start": at, "unit": "steps"}}]}


def _error(data: dict, **kw) -> OptolabError:
    with pytest.raises(OptolabError) as e:
        validate_protocol(_with(data, **kw))
    return e.value


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("data, field, words", [
    ({**B2, "phases": [{"mix": {"task": 1, "zz": 1}}]}, "data.phases.0.mix.zz", "unknown task name 'zz'"),
    ({**B2, "phases": [{"task": "b2", "mix": {"b2": 1}}]}, "data.phases.0.task", "exactly one of task or mix"),
    ({**B2, "phases": [{"mix": {"b2": 0}}]}, "data.phases.0.mix.b2", "positive"),
    ({**B2, "phases": [{"mix": {"b2": True}}]}, "data.phases.0.mix.b2", "not a number"),
    ({**B2, "phases": []}, "data.phases", "no phases"),
    ({"tasks": {"task": B2["tasks"]["b2"]}, "phases": [{"task": "task"}]}, "data.tasks.task", "protocol's own"),
    ({**B2, "phases": [{"task": "b2", "window": {"start": 5, "stop": 15, "unit": "steps"}},
                       {"mix": {"task": 1, "b2": 1}, "window": {"start": 10, "unit": "steps"}}]},
     "data.phases.1.window", "overlap (steps 10 to 15)"),
    ({**B2, "phases": [{"task": "b2", "window": {"start": 30, "unit": "steps"}}]},
     "data.phases.0.window.start", "past the end of training"),
    ({**B2, "phases": [{"task": "b2", "window": {"start": 305, "stop": 318}}]},  # 16 a step: none in it
     "data.phases.0.window", "covers no training step"),
    ({"tasks": {"b2": {**B2["tasks"]["b2"], "burstyness": 2}}, "phases": [{"task": "b2"}]},
     "data.tasks.b2.burstyness", "unknown key"),
    ({"phases": [{"task": {"kind": "fewshot", "dim": 16, "n_train_classes": 10, "n_test_classes": 10}}]},
     "data.phases.0.task", "d_input 16 (task: 32)"),
    ({"tasks": {"l7": {**B2["tasks"]["b2"], "n_labels": 7}}, "phases": [{"mix": {"task": 1, "l7": 1}}]},
     "data.tasks.l7", "n_labels 7 (task: 5)"),
    ({"tasks": {"nm": {**B2["tasks"]["b2"], "kind": "fewshot_nomask",
                       "generator": "tests.test_data_schedule:NoMaskTask"}},
      "phases": [{"mix": {"task": 1, "nm": 1}}]}, "data.phases.0.mix", "carry match_mask and 'nm''s do not"),
])
def test_a_bad_schedule_is_one_error_naming_the_field(data, field, words):
    e = _error(data)
    assert e.field == field, str(e)
    assert words in str(e) and e.fix, str(e)
    assert len(str(e).splitlines()) == 1


def test_with_clamps_every_task_must_give_batches_the_clamps_were_checked_on():
    nm = {**B2["tasks"]["b2"], "kind": "fewshot_nomask", "generator": "tests.test_data_schedule:NoMaskTask"}
    data = {"tasks": {"nm": nm}, "phases": [{"task": "nm", "window": {"start": 10, "unit": "steps"}}]}
    validate_protocol(_with(data))  # without clamps a switch needs only the same model inputs/outputs
    p = _with(data)
    p["clamps"] = [{"kind": "ablate", "site": "v1", "heads": [0]}]
    with pytest.raises(OptolabError) as e:
        validate_protocol(p)
    assert e.value.field == "data.tasks.nm" and "clamps were checked" in str(e.value)


def test_paths_resolve_relative_to_the_protocol_and_the_cli_refuses_with_exit_2(tmp_path, capsys):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "b2.yaml").write_text(f"kind: fewshot\n{_yaml(B2['tasks']['b2'])}")
    data = {"tasks": {"b3": {"spec": "specs/b2.yaml", "context_pairs": 3, "burstiness": 3}},
            "phases": [{"task": "specs/b2.yaml", "window": {"start": 10, "unit": "steps"}}]}
    p = load_protocol(write_protocol(tmp_path, _with({"phases": data["phases"]})))
    assert p.data.phases[0].task == validate_protocol(_with(B2 | {"phases": [{"task": "b2"}]})).data.tasks["b2"]
    # what a run records loads back the same, tasks inlined
    assert validate_protocol(p.resolved()) == p and p.resolved()["data"]["phases"][0]["task"]["burstiness"] == 2
    path = write_protocol(tmp_path, _with(data), "bad.yaml")  # 3 context pairs: another context length
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "data.tasks.b3" in err and "n_ctx" in err, err
    missing = write_protocol(tmp_path, _with({"phases": [{"task": "nope.yaml"}]}), "missing.yaml")
    assert main(["validate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "data.phases.0.task" in err and "nope.yaml" in err and "not found" in err, err


def _yaml(spec: dict) -> str:
    return "".join(f"{k}: {v}\n" for k, v in spec.items() if k != "kind")


# --- batches ---------------------------------------------------------------------------------


def _same(a, b) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs)) and torch.equal(a.targets, b.targets)
            and torch.equal(a.match_mask, b.match_mask))


def _data(data: dict, steps: int = 30) -> tuple:
    p = validate_protocol(_with(data, steps=steps))
    return p, TrainData(p, make_task(p.task))


def test_the_batch_of_a_step_is_the_task_of_its_window():
    p, d = _data({**B2, "phases": [{"task": "b2", "window": {"start": 160, "stop": 320}}]})  # steps 10..19
    own, b2 = d.tasks[OWN], d.tasks["b2"]
    assert own is d.task and b2 is not own
    for step in (0, 9, 10, 19, 20, 29):
        want = (b2 if 10 <= step < 20 else own).train_batch(3, step, 16)
        assert _same(d.train_batch(3, step, 16), want), step
    assert not _same(b2.train_batch(3, 12, 16), own.train_batch(3, 12, 16))  # the switch changes something


def test_a_mixture_takes_each_row_from_the_drawn_task_in_the_weights_proportions():
    p, d = _data({**B2, "phases": [{"mix": {"task": 1, "b2": 3}}]}, steps=400)
    own, b2 = d.tasks[OWN], d.tasks["b2"]
    phase = d.phases[0]
    shares = []
    for step in range(0, 400, 40):
        got = d.train_batch(5, step, 16)
        assert _same(got, d.train_batch(5, step, 16))  # a function of (seed, step)
        which = d.which(5, step, 16, phase)
        assert torch.equal(which, torch.multinomial(torch.tensor([0.25, 0.75], dtype=torch.float64), 16, True,
                                                    generator=rng(5, MIX_STREAM, step)))
        a, b = own.train_batch(5, step, 16), b2.train_batch(5, step, 16)
        for i, k in enumerate(which.tolist()):
            src = (a, b)[k]
            assert torch.equal(got.inputs[0][i], src.inputs[0][i]) and torch.equal(got.targets[i], src.targets[i])
            assert torch.equal(got.match_mask[i], src.match_mask[i])
        shares.append(which.float().mean().item())
        assert layout(got) == layout(a)
    assert abs(sum(shares) / len(shares) - 0.75) < 0.06  # 160 draws: 3.5 standard deviations
    assert len(set(shares)) > 1  # drawn per step, not fixed
    assert not torch.equal(d.which(6, 0, 16, phase), d.which(5, 0, 16, phase))  # and per data seed


# --- training --------------------------------------------------------------------------------


def _metrics(path) -> pd.DataFrame:
    df = pd.read_parquet(path / "metrics.parquet")
    return df.sort_values(["step", "split", "metric", "layer", "head"]).reset_index(drop=True)


def test_a_switch_changes_training_after_its_step_and_not_before(tmp_path):
    base = validate_protocol(fewshot_protocol(steps=30))
    switched = validate_protocol(_with(_switch(at=10)))
    train(base, tmp_path / "base", progress=False)
    train(switched, tmp_path / "switch", progress=False)
    a, b = _metrics(tmp_path / "base"), _metrics(tmp_path / "switch")
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    early, late = a.step <= 10, a.step > 10  # an eval at 10 saw steps 0..9: all before the switch
    assert a.value[early].equals(b.value[early])
    assert (a.value[late] != b.value[late]).mean() > 0.5
    # evals stay on the protocol's task; the run records the schedule
    assert set(a.split) == set(b.split)
    assert protocol_from_resolved(tmp_path / "switch" / "protocol.yaml") == switched


def _resume_data() -> dict:
    # a mixture over steps 5..15, then burstiness 2: the cut at 10 falls inside the mixture
    return {**B2, "phases": [{"mix": {"task": 1, "b2": 1}, "window": {"start": 5, "stop": 15, "unit": "steps"}},
                             {"task": "b2", "window": {"start": 15, "unit": "steps"}}]}


def test_resuming_across_a_switch_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    p = validate_protocol(_with(_resume_data()))
    full = train(p, tmp_path / "full", progress=False)
    train(p, tmp_path / "cut", progress=False, stop_after=10)
    resumed = train(p, tmp_path / "cut", progress=False)
    pd.testing.assert_frame_equal(_metrics(tmp_path / "full"), _metrics(tmp_path / "cut"))
    for (name, x), y in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_ensemble_members_with_a_schedule_equal_their_solo_runs(tmp_path):
    members = []
    for s in (0, 1):
        data = _with(_resume_data())
        data.update(name=f"m{s}", seeds={"init": s, "data": s, "eval": 1})
        members.append(validate_protocol(data))
    assert len({pack_key(m) for m in members}) == 1
    other = validate_protocol(_with(_switch(at=12)))
    assert pack_key(other) != pack_key(members[0])  # another schedule never packs with these
    train_ensemble(members, [tmp_path / "e0", tmp_path / "e1"])
    for s, m in enumerate(members):
        train(m, tmp_path / f"solo{s}", progress=False)
        x, y = _metrics(tmp_path / f"e{s}"), _metrics(tmp_path / f"solo{s}")
        pd.testing.assert_frame_equal(x.drop(columns="value"), y.drop(columns="value"))
        assert (x.value - y.value).abs().max() < 1e-5  # the ensemble's tolerance (tests/test_ensemble.py)


def test_the_compiled_paths_train_on_the_same_schedule(tmp_path):
    eager = validate_protocol(_with(_resume_data(), steps=20))
    train(eager, tmp_path / "eager", progress=False)
    compiled = validate_protocol(_with(_resume_data(), steps=20, compile=True))
    train(compiled, tmp_path / "compiled", progress=False)
    x, y = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert (x.value - y.value).abs().max() < 1e-5  # the compiled path's tolerance (tests/test_compiled.py)
    members = []
    for s in (0, 1):
        data = _with(_resume_data(), steps=20, compile=True)
        data.update(name=f"m{s}", seeds={"init": s, "data": s, "eval": 1})
        members.append(validate_protocol(data))
    train_ensemble(members, [tmp_path / "e0", tmp_path / "e1"])
    y = _metrics(tmp_path / "e0")
    assert (x.value - y.value).abs().max() < 1e-5  # member 0 has the eager run's seeds
