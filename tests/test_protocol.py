"""Protocol semantics: schedules, budgets, seeds, resolution."""

from __future__ import annotations

import math

from pathlib import Path

import pytest

from optolab.protocol.loader import load_protocol, validate_protocol
from optolab.protocol.schema import Schedule
from tests.conftest import ROOT, fewshot_protocol, write_protocol


def test_schedule_in_sequences_fires_at_the_first_step_reaching_each_point():
    s = Schedule(unit="sequences", every=100, dense=[{"until": 40, "every": 20}], at=[250])
    # batch 32: sequences 0, 20, 40, 100, 200, 250, 300 and the end (320 = step 10)
    assert s.steps(batch_size=32, total_steps=10, field="x") == [0, 1, 2, 4, 7, 8, 10]


def test_schedule_in_steps_always_includes_start_and_end():
    assert Schedule(unit="steps", every=4).steps(batch_size=32, total_steps=10, field="x") == [0, 4, 8, 10]


def test_counts_accept_scientific_notation_and_sequences_become_steps():
    p = validate_protocol({**fewshot_protocol(), "train": {"sequences": "1e3", "batch_size": 32}})
    assert p.train.total_steps == 32  # ceil(1000 / 32)
    assert p.eval_steps()[-1] == 32


def test_seed_flag_sets_init_and_data_but_not_eval(tmp_path):
    path = write_protocol(tmp_path, {**fewshot_protocol(), "seeds": {"init": 1, "data": 2, "eval": 7}})
    p = load_protocol(path, seed=5)
    assert (p.seeds.init, p.seeds.data, p.seeds.eval) == (5, 5, 7)


def test_resolved_protocol_has_every_default_and_round_trips():
    p = load_protocol(ROOT / "protocols" / "singh2024" / "main.yaml")
    r = p.resolved()
    assert r["model"]["d_head"] == 8 and r["task"]["scale"] == 2.0 and r["seeds"]["eval"] == 1
    assert validate_protocol(r) == p
    assert p.train.total_steps == 31_250


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "protocols").rglob("*.yaml") if not {"sweeps", "discover"} & set(p.parts)))
def test_every_shipped_protocol_validates_and_its_resolved_form_round_trips(path, tmp_path, monkeypatch):
    if "kind: token_corpus" in path.read_text():  # its corpus is built (scripts/), not shipped: a stand-in
        monkeypatch.chdir(tmp_path)  # the corpus path is relative to the folder optolab runs in
        corpus = tmp_path / "results" / "corpora" / "stdlib_py.txt"
        corpus.parent.mkdir(parents=True)
        corpus.write_text(Path(__file__).read_text())
    if "kind: toy_tensor" in path.read_text():
        from optolab.experiments.toy import ToyProtocol, load_toy

        toy = load_toy(path)
        assert ToyProtocol.model_validate(toy.model_dump()) == toy
    else:
        p = load_protocol(path)
        assert validate_protocol(p.resolved()) == p  # what a run records loads back the same
    assert path.read_text().startswith("#")  # each file opens with what it tests and expects


def test_task_overrides_apply_on_top_of_a_spec_file(tmp_path):
    (tmp_path / "t.yaml").write_text("kind: fewshot\ndim: 8\nn_labels: 5\n")
    path = write_protocol(tmp_path, {**fewshot_protocol(), "task": {"spec": "t.yaml", "n_labels": 10}})
    proto = load_protocol(path)
    assert proto.task.n_labels == 10 and proto.task.dim == 8


def test_a_schedule_that_would_fire_absurdly_often_is_refused():
    from optolab.core.errors import OptolabError

    with pytest.raises(OptolabError, match="measures.schedule.every"):
        validate_protocol({**fewshot_protocol(), "train": {"steps": 10**9},
                           "measures": {"schedule": {"unit": "steps", "every": 1}}})


def test_readme_clamp_example_validates_and_is_described_as_documented(capsys):
    import yaml

    from optolab.protocol.describe import describe_protocol

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A clamp", 1)[1]
    example = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    after = section.split("describes each clamp:", 1)[1]
    shown = after.split("```", 2)[1]  # the documented `optolab validate` output
    base = load_protocol(ROOT / "protocols" / "singh2024" / "fig5b_prev_token.yaml").resolved()
    p = validate_protocol({**base, **example})
    described = " ".join(" ".join(describe_protocol(p)).split())
    assert " ".join(shown.split()) in described


@pytest.mark.parametrize("path", sorted((ROOT / "protocols" / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_expands_into_valid_runs(path):
    from optolab.experiments.sweep import load_sweep

    spec, runs = load_sweep(path)
    assert len(runs) == len(spec.seeds) * len(spec.conditions) * max(1, math.prod(map(len, spec.grid.values())))
    assert path.read_text().startswith("#")
