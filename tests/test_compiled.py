"""The compiled path (``train.compile: true``): equal to the nnsight path for every clamp kind (up to
float rounding), solo and in ensembles, and a resumed compiled run repeats the uninterrupted one."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from optolab.ensemble import train_ensemble
from optolab.errors import OptolabError
from optolab.loader import validate_protocol
from optolab.model import build_model
from optolab.trainer import train

from .conftest import fewshot_protocol

# The compiler fuses and reorders float sums, so numbers agree to rounding, not bit for bit.
# Measured over 40 steps at lr 1e-3: at most 1e-6 on any metric, for every group below.
TOLERANCE = 1e-5
STEPS = 40


def _groups(tmp_path) -> dict[str, list[dict]]:
    donor = tmp_path / "donor"
    train(validate_protocol(fewshot_protocol(steps=2)), donor, progress=False)
    pattern = tmp_path / "pattern.safetensors"
    save_file({"p": torch.full((5, 5), 0.2)}, str(pattern))
    return {
        "none": [],
        # one pass, many site kinds; perfect_match has a window, so the run switches programs
        "site clamps": [
            {"kind": "ablate", "site": "v1", "heads": [0], "how": "zero"},
            {"kind": "ablate", "site": "result0", "heads": [1], "how": "mean"},
            {"kind": "ablate", "site": "z1", "heads": [3], "how": "resample", "positions": "query"},
            {"kind": "set", "site": "pattern0", "heads": [1], "to": "previous_token", "strength": 0.9},
            {"kind": "set", "site": "pattern1", "heads": [2], "to": "perfect_match",
             "window": {"start": 0, "stop": 25, "unit": "steps"}},
            {"kind": "set", "site": "pattern1", "heads": [0], "to": "file", "file": str(pattern)},
            {"kind": "set", "site": "q0", "to": "constant", "value": 0.0, "heads": [3]},
            {"kind": "stop_gradient", "site": "k1", "heads": [1, 2]},
            {"kind": "scale", "site": "scores1", "factor": 2.0},
            {"kind": "add", "site": "embed", "value": 0.1},
        ],
        "two passes": [{"kind": "preserve", "site": "pattern0"}, {"kind": "preserve", "site": "pattern1"},
                       {"kind": "ablate", "site": "v0", "heads": [1]},
                       {"kind": "perfect_copy", "layer": 1, "head": 3}],
        "three passes": [{"kind": "layer_clamp", "copy_head": 1}],
        "graft+freeze": [{"kind": "graft", "site": "resid_post0", "source": str(donor)},
                         {"kind": "freeze", "param": "blocks.1.attn.W_K", "heads": [0]}],
    }


def _protocol(clamps: list[dict], compiled: bool, seed: int = 0):
    data = fewshot_protocol(steps=STEPS)
    data.update(name=f"c{seed}", clamps=copy.deepcopy(clamps), seeds={"init": seed, "data": seed, "eval": 1})
    data["train"]["compile"] = compiled
    return validate_protocol(data)


def _max_diff(a, b) -> float:
    x, y = pd.read_parquet(a / "metrics.parquet"), pd.read_parquet(b / "metrics.parquet")
    pd.testing.assert_frame_equal(x.drop(columns="value"), y.drop(columns="value"))
    return float(np.nanmax(np.abs(x.value.to_numpy() - y.value.to_numpy())))


@pytest.mark.parametrize("group", ["none", "site clamps", "two passes", "three passes", "graft+freeze"])
def test_compiled_run_equals_the_nnsight_run(group, tmp_path):
    clamps = _groups(tmp_path)[group]
    ref = train(_protocol(clamps, False), tmp_path / "nnsight", progress=False)
    got = train(_protocol(clamps, True), tmp_path / "compiled", progress=False)
    assert _max_diff(tmp_path / "nnsight", tmp_path / "compiled") < TOLERANCE
    for (name, a), b in zip(ref.model.named_parameters(), got.model.parameters()):
        assert torch.allclose(a, b, atol=TOLERANCE, rtol=0), name
    if group == "graft+freeze":  # the frozen head did not move in either run
        k0 = build_model(got.model.cfg, 0).blocks[1].attn.W_K.detach()[:, 0]
        assert torch.equal(got.model.blocks[1].attn.W_K.detach()[:, 0], k0)


@pytest.mark.parametrize("group", ["site clamps", "three passes"])
def test_compiled_ensemble_members_equal_their_nnsight_runs(group, tmp_path):
    clamps = _groups(tmp_path)[group]
    members = [_protocol(clamps, True, seed=s) for s in (0, 1)]
    train_ensemble(members, [tmp_path / "e0", tmp_path / "e1"])
    for s in (0, 1):
        train(_protocol(clamps, False, seed=s), tmp_path / f"solo{s}", progress=False)
        assert _max_diff(tmp_path / f"e{s}", tmp_path / f"solo{s}") < TOLERANCE


def test_a_resumed_compiled_run_repeats_the_uninterrupted_one(tmp_path):
    clamps = _groups(tmp_path)["site clamps"]
    protocol = _protocol(clamps, True)
    full = train(protocol, tmp_path / "full", progress=False)
    train(protocol, tmp_path / "cut", progress=False, stop_after=20)
    resumed = train(protocol, tmp_path / "cut", progress=False)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert full.run_dir.metrics()["value"].equals(resumed.run_dir.metrics()["value"])


def test_no_cpp_compiler_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr("optolab.compiled.shutil.which", lambda name: None)
    with pytest.raises(OptolabError) as err:
        train(_protocol([], True), tmp_path / "run", progress=False)
    assert err.value.field == "train.compile" and "train.compile: false" in err.value.fix
    assert not (tmp_path / "run").exists()
