"""Issue 29: nothing of the user's is deleted, a refusal writes nothing, failing trackers are
dropped, and the newest surfaces are one line each.

- ``--overwrite`` with a file of the user's in every folder of a run (and a folder, and a link):
  refused naming it, the tree byte for byte as it was; without them, only optolab's files go.
- Every check that can refuse a run (init_from, data schedules, devices, trackers, checkpoints,
  the logs a resume cuts, the run directory and its lock) refuses before ``--out`` is created
  or changed: the whole tree is compared, bytes and modes, before and after.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from optolab.cli import main
from optolab.protocol.loader import load_protocol
from optolab.training.trainer import train
from optolab.training.rundir import LISTED, RECORD

from .conftest import ROOT, fewshot_protocol, write_protocol

torch.set_num_threads(1)

CORPUS = Path(__file__).parent / "bad_inputs"


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and bytes (a link: its target), by relative path."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = ("file", st.st_mode, p.read_bytes())
    return out


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Fix:" in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _protocol(tmp_path: Path, name: str = "p.yaml", steps: int = 20, **extra) -> Path:
    data = fewshot_protocol(steps=steps)
    data.update(extra)
    return write_protocol(tmp_path, data, name)


# --- --overwrite ------------------------------------------------------------------------------


def _a_run_with_every_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A finished run with checkpoints/, figures/, per_example/, tensorboard/, posthoc/ (an
    `optolab evaluate` CSV), and the folders wandb and the LLC measure write (as they write them)."""
    path = _protocol(tmp_path, steps=10)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    assert main(["evaluate", str(path), "--checkpoint", str(out)]) == 0
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1765000000.host.1.0").write_bytes(b"tb")
    wandb_run = out / "wandb" / "offline-run-20261207_001956-optolab-97f327b320662123"
    (wandb_run / "files" / "media").mkdir(parents=True)
    (wandb_run / "files" / "media" / "loss_0_6bd9.png").write_bytes(b"png")
    (wandb_run / "run-optolab-97f327b320662123.wandb").write_bytes(b"w")
    (out / "wandb" / "debug.log").write_text("log")
    (out / "wandb" / "latest-run").symlink_to(wandb_run.name)
    llc = out / "measures" / "llc" / "calibration_000000010"
    llc.mkdir(parents=True)
    (llc / "calibration.csv").write_text("a,b\n")
    (out / "measures" / "llc" / "estimates.jsonl").write_text("")
    (out / "checkpoints" / "step_00000010.json.tmp").write_text("{")  # an interrupted write
    return path, out


USER_FILES = {  # a file of the user's: what the refusal names
    "notes.txt": "notes.txt", "checkpoints/mine.safetensors": "checkpoints/mine.safetensors",
    "checkpoints/step_00000010.json.bak": "checkpoints/step_00000010.json.bak",
    "figures/my_plot.png": "figures/my_plot.png", "per_example/notes.md": "per_example/notes.md",
    "posthoc/mine.csv": "posthoc/mine.csv", "tensorboard/notes.txt": "tensorboard/notes.txt",
    "wandb/my_notes.txt": "wandb/my_notes.txt", "measures/llc/mine.json": "measures/llc/mine.json",
    "measures/llc/calibration_000000010/mine.txt": "measures/llc/calibration_000000010/mine.txt",
    "measures/mine/result.json": "measures/mine/",  # a folder optolab never makes: named itself
}


def test_overwrite_refuses_a_user_file_in_any_folder_and_deletes_only_what_optolab_wrote(tmp_path, capsys):
    path, out = _a_run_with_every_folder(tmp_path)
    for rel, named in USER_FILES.items():
        target = out / rel
        made = [d for d in reversed(target.parents) if not d.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("the user's")
        before = _tree(tmp_path)
        assert main(["run", str(path), "--out", str(out), "--overwrite", "--no-progress"]) == 2, rel
        _one_line(capsys, named, "--overwrite deletes only a run's own files")
        assert _tree(tmp_path) == before, rel  # nothing deleted, nothing written
        target.unlink()
        for d in reversed(made):
            d.rmdir()
    # a folder of the user's (even empty) and a link are the user's too
    (out / "figures" / "mine").mkdir()
    (out / "checkpoints" / "link.safetensors").symlink_to(out / "checkpoints" / "step_00000010.safetensors")
    before = _tree(tmp_path)
    assert main(["run", str(path), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    _one_line(capsys, "checkpoints/link.safetensors", "figures/mine/")
    assert _tree(tmp_path) == before
    (out / "figures" / "mine").rmdir()
    (out / "checkpoints" / "link.safetensors").unlink()
    assert main(["run", str(path), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    left = set(_tree(out))
    assert not {p for p in left if p.split("/")[0] in ("wandb", "tensorboard", "posthoc", "measures")}, left
    assert "checkpoints/step_00000010.json.tmp" not in left
    listed = (out / ".optolab.files").read_text().splitlines()  # the new run lists its own checkpoints only
    assert listed[0] == LISTED and all(p.startswith("checkpoints/step_") for p in listed[1:])
    assert (out / "summary.json").is_file()


def test_overwrite_keeps_a_checkpoint_copied_in_under_a_step_name(tmp_path, capsys):
    # a step name optolab uses is not enough: a run lists the checkpoint files it wrote
    path = write_protocol(tmp_path, fewshot_protocol(steps=20))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    copied = out / "checkpoints" / "step_00000099.safetensors"
    shutil.copy(out / "checkpoints" / "step_00000020.safetensors", copied)
    before = _tree(tmp_path)
    assert main(["run", str(path), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    _one_line(capsys, "checkpoints/step_00000099.safetensors", "--overwrite deletes only a run's own files")
    assert _tree(tmp_path) == before
    # a run written before runs listed their checkpoints is judged by the names alone, as then
    (out / RECORD).unlink()
    assert main(["run", str(path), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert not copied.exists() and (out / RECORD).read_text().startswith(LISTED)


# --- a refusal writes nothing -----------------------------------------------------------------


def _stopped(tmp_path: Path, path: Path, name: str = "stopped") -> Path:
    out = tmp_path / name
    train(load_protocol(path), out, progress=False, stop_after=10)
    return out


def _garble(p: Path) -> None:
    p.write_bytes(b"\x00garbage, not a safetensors header")


def _other_shape(p: Path) -> None:
    state = load_file(str(p))
    state["W_L"] = torch.zeros(state["W_L"].shape[0], state["W_L"].shape[1] * 2)
    save_file(state, str(p))


def test_every_refusal_leaves_the_tree_as_it_was(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _protocol(tmp_path)
    src = _stopped(tmp_path, path, "src")  # a run to start from (checkpoints at 0 and 10)
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    bare = src / "checkpoints" / "step_00000010.safetensors"
    (tmp_path / "lone").mkdir()
    shutil.copy(bare, tmp_path / "lone" / "step_00000010.safetensors")  # weights without Adam state
    (tmp_path / "torn").mkdir()
    _garble(tmp_path / "torn" / "step_00000010.safetensors")
    wide = fewshot_protocol()["model"] | {"d_model": 32}
    fresh = {  # protocols whose run is refused before anything exists: (extra keys, CLI flags, words)
        "missing run": ({"init_from": {"run": "nowhere"}}, [], ("init_from.run", "does not exist")),
        "missing step": ({"init_from": {"run": "src", "step": 15}}, [], ("init_from.step", "no checkpoint at step 15")),
        "corrupt file": ({"init_from": {"run": "torn/step_00000010.safetensors"}}, [],
                         ("init_from.run", "not a readable safetensors file", "another checkpoint")),
        "other model": ({"init_from": {"run": "src"}, "model": wide}, [],
                        ("init_from.run", "step_00000010.safetensors", "does not fit", "same model")),
        "symlink loop": ({"init_from": {"run": "loopA"}}, [], ("init_from.run", "loops")),
        "no Adam state": ({"init_from": {"run": "lone/step_00000010.safetensors", "optimizer": True}}, [],
                          ("init_from.optimizer", "no optimizer state")),
        "data schedule": ({"data": {"tasks": {"b2": fewshot_protocol()["task"] | {"burstiness": 2}},
                                    "phases": [{"task": "b2", "window": {"start": 20, "unit": "steps"}}]}}, [],
                          ("data.phases.0.window.start", "past the end")),
        "device": ({}, ["--device", "cuda:99"], ("train.device",)),
        "seed": ({}, ["--seed", str(2**64)], ("--seed", "non-negative integer")),
    }
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else _find(name, *a))
    fresh["tracker"] = ({"train": fewshot_protocol(steps=20)["train"] | {"track": ["wandb"]}}, [],
                        ("train.track", "not installed"))
    for case, (extra, flags, words) in fresh.items():
        p = _protocol(tmp_path, "case.yaml", **extra)
        before = _tree(tmp_path)
        assert _cli(["run", str(p), "--out", str(tmp_path / "new"), "--no-progress", *flags]) == 2, case
        _one_line(capsys, *words)
        assert _tree(tmp_path) == before, case
    # the corrected command then runs (nothing was left to call it "a different protocol")
    p = _protocol(tmp_path, "case.yaml", init_from={"run": "src", "step": 10})
    assert main(["run", str(p), "--out", str(tmp_path / "new"), "--no-progress"]) == 0
    capsys.readouterr()

    damages = {  # a stopped run, damaged: its resume is refused (what to do, the words)
        "checkpoint garbled": (lambda o: _garble(o / "checkpoints" / "step_00000010.safetensors"),
                               ("step_00000010.safetensors", "not a readable safetensors file")),
        "checkpoint of another shape": (lambda o: _other_shape(o / "checkpoints" / "step_00000010.safetensors"),
                                        ("stopped/checkpoints/step_00000010.safetensors", "does not fit this model")),
        "Adam state garbled": (lambda o: _garble(o / "checkpoints" / "step_00000010.optim.safetensors"),
                               ("step_00000010.optim.safetensors", "not a readable")),
        "sidecar damaged": (lambda o: (o / "checkpoints" / "step_00000010.json").write_text("[1, 2"),
                            ("step_00000010.json", "damaged")),
        "metrics row not an object": (lambda o: _append(o / "metrics.jsonl", "[]\n"),
                                      ("metrics.jsonl:", "not a row of this log", "delete that line")),
        "metrics row without a step": (lambda o: _append(o / "metrics.jsonl", '{"step": "ten"}\n'),
                                       ("metrics.jsonl:", "not a row")),
        "per-example index": (lambda o: _append(o / "per_example" / "index.jsonl", "7\n"),
                              ("index.jsonl:", "not a row")),
        "meta.json damaged": (lambda o: (o / "meta.json").write_text("{not json"), ("meta.json", "damaged")),
        "protocol.yaml damaged": (lambda o: (o / "protocol.yaml").write_text("name: [unclosed"),
                                  ("protocol.yaml", "damaged")),
        "a different protocol": (lambda o: None, ("different protocol",)),
        "lock file is a folder": (lambda o: ((o / ".optolab.lock").unlink(), (o / ".optolab.lock").mkdir()),
                                  (".optolab.lock", "is a folder")),
    }
    other = _protocol(tmp_path, "other.yaml", model=wide)
    stopped = _stopped(tmp_path, path, "stopped0")
    for case, (damage, words) in damages.items():
        out = tmp_path / "stopped"
        shutil.copytree(stopped, out, symlinks=True)
        damage(out)
        before = _tree(tmp_path)
        proto = other if case == "a different protocol" else path
        assert main(["run", str(proto), "--out", str(out), "--no-progress"]) == 2, case
        _one_line(capsys, *words)
        assert _tree(tmp_path) == before, case
        shutil.rmtree(out)
    # the same with --overwrite: a refusal after the check of the folder deletes nothing either
    out = stopped
    p = _protocol(tmp_path, "case.yaml", init_from={"run": "src", "step": 15})
    before = _tree(tmp_path)
    assert main(["run", str(p), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    _one_line(capsys, "init_from.step")
    assert _tree(tmp_path) == before


_find = importlib.util.find_spec


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # a bad flag: argparse exits
        return e.code


def _append(p: Path, text: str) -> None:
    with p.open("a") as f:
        f.write(text)


def test_a_resume_after_the_damaged_line_is_removed_continues(tmp_path, capsys):
    path = _protocol(tmp_path)
    out = _stopped(tmp_path, path)
    good = (out / "metrics.jsonl").read_text()
    _append(out / "metrics.jsonl", "[]\n")
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    _one_line(capsys, f"metrics.jsonl:{len(good.splitlines()) + 1}")
    (out / "metrics.jsonl").write_text(good)
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0


# --- trackers ---------------------------------------------------------------------------------


def test_a_tracker_that_cannot_start_is_dropped_and_the_run_goes_on(tmp_path, capsys, caplog, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    path = _protocol(tmp_path, train=fewshot_protocol(steps=20)["train"] | {"track": ["tensorboard"]})
    out = _stopped(tmp_path, path)
    shutil.rmtree(out / "tensorboard")
    (out / "tensorboard").write_text("a file where the tracker's folder goes")
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert "tracker tensorboard dropped (FileExistsError" in caplog.text  # the CLI's stderr (logging's last resort)
    caplog.clear()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["tracker_failures"][0].startswith("tensorboard: FileExistsError")
    # a wandb that fails at import (a broken install): dropped likewise, on a fresh run
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('cannot import name protobuf (broken install)')\n")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    importlib.invalidate_caches()
    path = _protocol(tmp_path, "w.yaml", steps=10, train=fewshot_protocol(steps=10)["train"] | {"track": ["wandb"]})
    assert main(["run", str(path), "--out", str(tmp_path / "w"), "--no-progress"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert "tracker wandb dropped (ImportError: cannot import name protobuf" in caplog.text
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["tracker_failures"] == [
        "wandb: ImportError: cannot import name protobuf (broken install)"]


# --- protocols, flags and the lock --------------------------------------------------------------


def test_a_file_name_that_is_not_a_valid_name_gives_a_derived_one(tmp_path, capsys):
    assert main(["validate", str(CORPUS / "my protocol é v2.yaml")]) == 0
    assert "Protocol 'my_protocol_e_v2'" in capsys.readouterr().out
    assert load_protocol(CORPUS / "my protocol é v2.yaml").name == "my_protocol_e_v2"
    for stem, name in (("日本", "protocol"), ("a  b--c", "a_b--c"), ("Ünïcode+1.0", "Unicode+1.0")):
        p = tmp_path / f"{stem}.yaml"
        shutil.copy(CORPUS / "my protocol é v2.yaml", p)
        assert load_protocol(p).name == name


def test_a_homoglyph_key_is_reported_first_naming_the_character(capsys):
    assert main(["validate", str(CORPUS / "homoglyph_key.yaml")]) == 2
    err = _one_line(capsys, "U+0430 CYRILLIC SMALL LETTER A", "did you mean 'train'")
    assert "Field required" not in err  # the missing 'train' it hides is the second problem


@pytest.mark.parametrize("seed", [str(2**64), "2**64", "-1", "x"])
def test_a_bad_seed_flag_is_one_line(tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as e:
        main(["run", str(CORPUS / "ckpt_protocol.yaml"), "--seed", seed, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    _one_line(capsys, "--seed", repr(seed), "pass e.g. --seed 3")
    assert not (tmp_path / "o").exists()


def test_a_lock_file_that_cannot_be_written_is_named(tmp_path):
    path = _protocol(tmp_path)
    out = _stopped(tmp_path, path)
    (out / ".optolab.lock").chmod(0o444)
    os.chmod(tmp_path, 0o777)
    argv = [sys.executable, "-m", "optolab.cli", "run", str(path), "--out", str(out), "--no-progress"]
    if os.geteuid() == 0:  # root writes anything: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        caps = "-dac_override,-dac_read_search"
        argv = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, *argv]
    before = _tree(tmp_path)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if done.returncode != 2 and "Operation not permitted" in done.stderr:
        pytest.skip("setpriv may not drop capabilities here")
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert ".optolab.lock' for writing: Permission denied (the folder itself is writable)" in err, err
    assert "chmod u+w" in err and "cannot write in" not in err
    assert _tree(tmp_path) == before
