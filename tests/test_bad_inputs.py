"""The bad-input corpus (tests/bad_inputs/, listed in its MANIFEST.yaml): every file gives one
line naming the file, the field (and line) and the fix, exit code 2, no traceback, and writes
nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from optolab.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
MANIFEST = yaml.safe_load((CORPUS / "MANIFEST.yaml").read_text())
CASES = [e for e in MANIFEST if e["expect"]]


def test_the_corpus_is_large_and_every_file_is_listed():
    assert len(CASES) >= 40
    listed = {e["file"] for e in MANIFEST}
    on_disk = {p.name for p in CORPUS.iterdir()} - {"MANIFEST.yaml"}
    assert on_disk <= listed, f"unlisted corpus files: {sorted(on_disk - listed)}"
    assert all((CORPUS / e["file"]).is_file() for e in MANIFEST if not e.get("absent"))


def _argv(case: dict, out: Path) -> list[str]:
    path = str(CORPUS / case["file"])
    command = case["command"]
    if command == "validate":  # `run` validates the same way, and must not create --out
        return ["run", path, "--out", str(out), "--no-progress"]
    if command == "tasks check":
        return ["tasks", "check", path]
    if command == "sweep":
        return ["sweep", path, "--out", str(out)]
    if command == "discover":
        return ["discover", path, "--out", str(out)]
    if command == "evaluate":
        return ["evaluate", str(CORPUS / "ckpt_protocol.yaml"), "--checkpoint", path, "--out", str(out / "x.csv")]
    raise AssertionError(f"unknown command {command}")


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_bad_input_gives_one_line_naming_file_field_and_fix(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(case, out)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "Fix:" in err, err
    assert case["file"] in err, err
    for words in case["expect"]:
        assert words in err, (words, err)
    if "line" in case:
        assert f"{case['file']}:{case['line']}" in err, err
    assert not out.exists()  # nothing written


def test_a_huge_file_and_a_bomb_in_a_valid_protocol_are_refused_in_one_line(tmp_path, capsys):
    # (refusal times are in the closing note / docs/robustness.md: milliseconds; no timed test)
    big = tmp_path / "big.yaml"
    big.write_text("name: big\ndescription: '" + "x" * (50 * 2**20) + "'\n")
    valid = (CORPUS / "sweep_base.yaml").read_text()
    bomb = tmp_path / "bomb.yaml"
    layers = ['x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
        f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text(valid.replace("name: bad", "name: bomb\ndescription: {" + ", ".join(layers) + "}"))
    for path, words in ((big, "50.0 MiB"), (bomb, "through its aliases")):
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Fix:" in err, err
