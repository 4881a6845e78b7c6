"""Bad input: one line naming the file, field and fix; exit code 2; no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from optolab.cli import main
from tests.conftest import ROOT, fewshot_protocol, write_protocol

QUICK = ROOT / "protocols" / "quickstart.yaml"


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def with_change(base: dict, path: str, value) -> dict:
    import copy

    data = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    cur = data
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[leaf] = value
    return data


CASES = {
    "unknown top-level key": ("trian", {"lr": 1}, "trian", "did you mean 'train'"),
    "unknown nested key": ("train.learning_rate", 0.1, "train.learning_rate", "lr"),
    "wrong type": ("train.batch_size", "big", "train.batch_size", "whole number"),
    "negative lr": ("train.lr", -0.001, "train.lr", "> 0"),
    "n_heads not dividing d_model": ("model.n_heads", 5, "model.n_heads", "does not divide d_model"),
    "seed not an integer": ("seeds.init", 1.5, "seeds.init", "whole number"),
    "seed as a string": ("seeds.data", "zero", "seeds.data", "whole number"),
    "bad positional": ("model.positional", "sinusoidal", "model.positional", "rope"),
    "unknown task kind": ("task.kind", "omniglot", "task", "kind"),
    "impossible task": ("task.burstiness", 5, "task", "burstiness"),
    "negative noise": ("task.noise", -0.5, "task.noise", ">= 0"),
    "eval point past the end": ("measures.schedule", {"unit": "steps", "at": [999]}, "measures.schedule.at.0", "<= 30"),
    "both budgets": ("train.sequences", 100, "train", "exactly one"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_protocol_gives_one_clear_line_and_exit_2(tmp_path, capsys, case):
    path_, value, field, fix = CASES[case]
    path = write_protocol(tmp_path, with_change(fewshot_protocol(), path_, value))
    code, err = run_cli(capsys, "validate", path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert str(path) in lines[0] and field in lines[0] and fix in lines[0], lines[0]


def test_error_points_at_the_yaml_line(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\ntask: {kind: repeat_tokens}\ntrain:\n  steps: 10\n  lr: -1\n")
    code, err = run_cli(capsys, "validate", path)
    assert code == 2 and f"{path}:5: train.lr" in err


@pytest.mark.parametrize("content, expect", [
    ("", "empty"),
    ("name: [unclosed\n", "YAML syntax error"),
    ("- just\n- a list\n", "mapping"),
    (b"name: caf\xe9\n", "UTF-8"),
])
def test_unreadable_protocol_files(tmp_path, capsys, content, expect):
    path = tmp_path / "p.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = run_cli(capsys, "validate", path)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1


def test_missing_protocol_and_missing_task_file(tmp_path, capsys):
    code, err = run_cli(capsys, "validate", tmp_path / "nope.yaml")
    assert code == 2 and "not found" in err
    path = write_protocol(tmp_path, with_change(fewshot_protocol(), "task", "../tasks/nope.yaml"))
    code, err = run_cli(capsys, "validate", path)
    assert code == 2 and "task" in err and "nope.yaml" in err and "Fix:" in err


def test_error_inside_a_task_file_names_that_file(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("kind: fewshot\ndim: 8\nn_labels: 1\n")
    path = write_protocol(tmp_path, with_change(fewshot_protocol(), "task", "t.yaml"))
    code, err = run_cli(capsys, "validate", path)
    assert code == 2 and "t.yaml:3: n_labels" in err


def test_override_error_names_the_protocol(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("kind: fewshot\ndim: 8\n")
    path = write_protocol(tmp_path, with_change(fewshot_protocol(), "task", {"spec": "t.yaml", "n_labels": "x"}))
    code, err = run_cli(capsys, "validate", path)
    assert code == 2 and "p.yaml" in err and "task.n_labels" in err


def test_bad_seed_flag_and_subprocess_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "optolab.cli", "run", str(QUICK), "--seed", "abc"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "seed must be a non-negative integer" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Fix:" in out.stderr  # not a usage dump
    out = subprocess.run([sys.executable, "-m", "optolab.cli", "validate", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_run_refuses_a_folder_holding_a_different_protocol_without_touching_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    path = write_protocol(tmp_path, fewshot_protocol())
    code, err = run_cli(capsys, "run", path, "--out", out, "--no-progress")
    assert code == 2 and "not an optolab run directory" in err
    assert (out / "notes.txt").read_text() == "precious"


# --- random mutations never crash the loader ------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from optolab.core.errors import OptolabError  # noqa: E402
from optolab.protocol.loader import validate_protocol  # noqa: E402
from tests.conftest import repeat_protocol  # noqa: E402

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from([fewshot_protocol(), repeat_protocol()]), data=st.data())
def test_mutated_protocols_are_accepted_or_refused_with_an_optolab_error(base, data):
    import copy

    proto = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(proto))
        path = data.draw(st.sampled_from(paths))
        cur = proto
        for k in path[:-1]:
            cur = cur[k]
        if data.draw(st.booleans()):
            cur[path[-1]] = data.draw(ODD_VALUES)
        else:
            cur[data.draw(st.text(min_size=1, max_size=6))] = data.draw(ODD_VALUES)
    try:
        validate_protocol(proto)
    except OptolabError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("argv", [["llc", "RUN", "--step-size", "-1e-4"],
                                  ["llc", "RUN", "--calibrate", "--step-sizes", "-1e-4", "1e-5"]])
def test_a_value_read_as_a_flag_says_to_join_it_to_its_flag(argv, capsys):
    # argparse reads "-1e-4" as a flag, not a number: the line must say how to pass it
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    flag = argv[-2] if argv[-1] == "-1e-4" else argv[-3]
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"{flag}=VALUE" in err and "-1e-4" in err
