"""Damaged run directories, bad output paths and plugin modules that misbehave at import: one
line naming the file or field and the fix, exit code 2, nothing deleted."""

from __future__ import annotations

import json
import sys

import pytest

from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.protocol.loader import load_protocol, validate_protocol
from optolab.training.trainer import train

from .conftest import fewshot_protocol, write_protocol


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Fix:" in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture
def stopped_run(tmp_path):
    path = write_protocol(tmp_path, fewshot_protocol(steps=20))
    out = tmp_path / "run"
    train(load_protocol(path), out, progress=False, stop_after=10)
    return path, out


@pytest.mark.parametrize("damage, words", [
    (lambda out: (out / "protocol.yaml").write_text("name: [unclosed"), ("protocol.yaml", "damaged")),
    (lambda out: (out / "meta.json").write_text("{not json"), ("meta.json", "damaged")),
    (lambda out: (out / "checkpoints" / "step_00000010.json").write_text("[1, 2"), ("step_00000010.json", "damaged")),
])
def test_resuming_a_damaged_run_is_one_line(stopped_run, capsys, damage, words):
    path, out = stopped_run
    damage(out)
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    _one_line(capsys, *words)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_out_paths_that_cannot_be_a_run_are_one_line(tmp_path, capsys):
    path = write_protocol(tmp_path, fewshot_protocol(steps=5))
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for out, words in ((a_file, "is a file"), (a_file / "under", "cannot create"),
                       (tmp_path / ("x" * 300), "cannot create")):
        assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
        _one_line(capsys, "--out", words)
    assert a_file.read_text() == "mine"


def test_evaluate_out_that_is_a_folder_is_one_line(stopped_run, capsys, tmp_path):
    path, out = stopped_run
    assert main(["evaluate", str(path), "--checkpoint", str(out), "--out", str(tmp_path)]) == 2
    _one_line(capsys, "is a folder")


def test_seeds_beyond_what_torch_takes_are_refused(tmp_path):
    data = fewshot_protocol(steps=5)
    data["seeds"] = {"init": 2**64}
    with pytest.raises(OptolabError, match="seeds.init"):
        validate_protocol(data)
    with pytest.raises(SystemExit):  # argparse: usage and the reason, exit 2
        main(["run", str(write_protocol(tmp_path, fewshot_protocol(steps=5))), "--seed", str(2**64)])


@pytest.mark.parametrize("module, source, words", [
    ("exits_at_import", "import sys\nsys.exit(3)\n", "called exit"),
    ("raises_at_import", "raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("pkg_entry.__main__", None, "entry module"),
    (".relative", None, "relative module"),
])
def test_generators_that_misbehave_at_import_are_one_line(tmp_path, monkeypatch, module, source, words):
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = fewshot_protocol(steps=5)
    data["task"] = {"generator": f"{module}:Task"}
    try:
        with pytest.raises(OptolabError) as e:
            validate_protocol(data)
    finally:
        sys.modules.pop(module, None)
    assert words in str(e.value) and "task.generator" in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_meta_json_is_reported_when_opening_the_run(stopped_run):
    from optolab.api import open_run

    _, out = stopped_run
    (out / "meta.json").write_text(json.dumps([1, 2]))
    with pytest.raises(OptolabError, match="meta.json.*damaged"):
        open_run(out).meta


def test_a_full_disk_stops_the_run_saying_why_and_it_resumes(tmp_path, monkeypatch, capsys):
    import errno

    from optolab.training.rundir import RunDir

    path = write_protocol(tmp_path, fewshot_protocol(steps=30))
    out = tmp_path / "run"
    real = RunDir.append_metrics
    calls = []

    def full(self, rows):
        calls.append(1)
        if len(calls) > 2:  # the third eval finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rows)

    monkeypatch.setattr(RunDir, "append_metrics", full)
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 1
    _one_line(capsys, "No space left on device", "resume")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "failed" and "No space left" in meta["failure"]
    monkeypatch.setattr(RunDir, "append_metrics", real)
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0  # the same command resumes
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
