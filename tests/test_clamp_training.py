"""Clamps during training: windows, phases, freezes, the hooks fast path, resumption, learning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import optolab
from optolab.api import open_run
from optolab.protocol.loader import validate_protocol
from optolab.training.trainer import train
from tests.conftest import fewshot_protocol, write_protocol
from tests.test_clamps import P0, setup

PREV = {"kind": "set", "site": "pattern0", "heads": [1], "to": "previous_token"}


def is_prev(pattern: torch.Tensor) -> bool:
    return bool(torch.allclose(pattern.diagonal(-1, -2, -1), torch.tensor(1.0)))


class TestWindows:
    def test_window_switches_on_and_off_at_the_right_step(self):
        _, _, model, fwd, batch = setup([{**PREV, "window": {"start": 3, "stop": 6, "unit": "steps"}}])
        on = {s: is_prev(fwd(model, batch, step=s, training=True, save=[P0])[1][P0][:, 1]) for s in range(9)}
        assert on == {0: False, 1: False, 2: False, 3: True, 4: True, 5: True, 6: False, 7: False, 8: False}

    def test_sequences_window_and_eval_rules(self):
        # batch 16: 48 sequences = step 3; a window to the end also covers the final evaluation (step 30)
        _, _, model, fwd, batch = setup([{**PREV, "window": {"start": 48}}])
        got = lambda s, tr: is_prev(fwd(model, batch, step=s, training=tr, save=[P0])[1][P0][:, 1])  # noqa: E731
        assert not got(2, True) and got(3, True) and got(29, True) and got(30, False)
        _, _, model, fwd, batch = setup([{**PREV, "window": {"stop": 10, "unit": "steps"}}])
        assert got(9, False) and not got(10, False) and not got(30, False)

    @pytest.mark.parametrize("apply_at,train_on,eval_on", [("train", True, False), ("eval", False, True),
                                                           ("both", True, True)])
    def test_apply_at(self, apply_at, train_on, eval_on):
        _, _, model, fwd, batch = setup([{**PREV, "apply_at": apply_at}])
        assert is_prev(fwd(model, batch, step=1, training=True, save=[P0])[1][P0][:, 1]) == train_on
        assert is_prev(fwd(model, batch, step=1, training=False, save=[P0])[1][P0][:, 1]) == eval_on


class TestFreeze:
    def test_frozen_heads_bit_identical_others_move(self, tmp_path):
        data = fewshot_protocol(steps=20)
        data["clamps"] = [{"kind": "freeze", "param": "blocks.0.attn.W_V", "heads": [1, 3]},
                          {"kind": "freeze", "param": "W_U", "window": {"start": 5, "stop": 12, "unit": "steps"}}]
        data["train"]["weight_decay"] = 0.1  # decay must not move frozen weights either
        data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "at": [5, 12]}}
        run = open_run(train(validate_protocol(data), tmp_path / "r", progress=False).run_dir.path)
        w0, w5, w12, w20 = (run.model(s) for s in (0, 5, 12, 20))
        a, b = w0.blocks[0].attn.W_V, w20.blocks[0].attn.W_V
        assert torch.equal(a[:, [1, 3]], b[:, [1, 3]]) and not torch.equal(a[:, [0, 2]], b[:, [0, 2]])
        assert torch.equal(w5.W_U, w12.W_U) and not torch.equal(w0.W_U, w5.W_U) and not torch.equal(w12.W_U, w20.W_U)

    def test_freeze_to_checkpoint_values(self, tmp_path):
        donor = train(validate_protocol(fewshot_protocol(steps=10)), tmp_path / "donor", progress=False)
        data = fewshot_protocol(steps=10)
        data["clamps"] = [{"kind": "freeze", "param": "blocks.0.attn.W_Q", "source": str(tmp_path / "donor")}]
        out = train(validate_protocol(data), tmp_path / "r", progress=False)
        assert torch.equal(out.model.blocks[0].attn.W_Q, donor.model.blocks[0].attn.W_Q)
        assert not torch.equal(out.model.blocks[0].attn.W_K, donor.model.blocks[0].attn.W_K)


def _every_kind(tmp_path) -> list[list[dict]]:
    donor = tmp_path / "donor"
    if not donor.exists():
        train(validate_protocol(fewshot_protocol(steps=5)), donor, progress=False)
    tensor = tmp_path / "pattern.safetensors"
    save_file({"p": torch.full((5, 5), 0.2)}, str(tensor))
    return [
        [{"kind": "ablate", "site": "v1", "heads": [0, 2], "how": "zero"}],
        [{"kind": "ablate", "site": "result0", "heads": [1], "how": "mean"}],
        [{"kind": "ablate", "site": "z1", "how": "resample", "positions": "query"}],
        [{"kind": "set", "site": "pattern0", "heads": [1], "to": "previous_token", "strength": 0.9}],
        [{"kind": "set", "site": "pattern1", "heads": [2], "to": "perfect_match"}],
        [{"kind": "set", "site": "pattern1", "heads": [0], "to": "uniform"}],
        [{"kind": "set", "site": "pattern1", "heads": [0], "to": "file", "file": str(tensor)}],
        [{"kind": "set", "site": "q0", "to": "constant", "value": 0.0, "heads": [3]}],
        [{"kind": "preserve", "site": "pattern0"}, {"kind": "preserve", "site": "pattern1"},
         {"kind": "ablate", "site": "v0", "heads": [1]}],
        [{"kind": "perfect_copy", "layer": 1, "head": 3}],
        [{"kind": "layer_clamp"}, {"kind": "ablate", "site": "v1", "heads": [0, 1, 2]}],
        [{"kind": "layer_clamp", "copy_head": 1}],
        [{"kind": "graft", "site": "resid_post0", "source": str(donor)}],
        [{"kind": "freeze", "param": "blocks.1.attn.W_K", "heads": [0]}],
        [{"kind": "stop_gradient", "site": "k1", "heads": [1, 2]}],
        [{"kind": "scale", "site": "scores1", "factor": 2.0}, {"kind": "add", "site": "embed", "value": 0.1}],
    ]


def test_hooks_fast_path_bit_identical_for_every_kind(tmp_path):
    kinds_seen = set()
    for i, clamps in enumerate(_every_kind(tmp_path)):
        params = []
        for engine in ("nnsight", "hooks"):
            data = fewshot_protocol(steps=6)
            data["clamps"] = clamps
            data["train"]["clamp_engine"] = engine
            result = train(validate_protocol(data), tmp_path / f"{i}_{engine}", progress=False)
            params.append({n: p.detach().clone() for n, p in result.model.named_parameters()})
            metrics = result.run_dir.metrics()
        kinds_seen |= {c["kind"] for c in clamps}
        for name in params[0]:
            assert torch.equal(params[0][name], params[1][name]), (clamps, name)
        assert metrics["value"].notna().all()
    assert kinds_seen == {"ablate", "set", "preserve", "perfect_copy", "layer_clamp", "graft", "freeze",
                          "stop_gradient", "scale", "add"}


def test_clamped_run_resumes_bit_identical(tmp_path):
    data = fewshot_protocol(steps=30)
    data["clamps"] = [{**PREV, "window": {"start": 5, "stop": 25, "unit": "steps"}},
                      {"kind": "freeze", "param": "blocks.1.attn.W_O", "window": {"start": 8, "unit": "steps"}}]
    protocol = validate_protocol(data)
    full = train(protocol, tmp_path / "full", progress=False)
    train(protocol, tmp_path / "cut", progress=False, stop_after=10)
    resumed = train(protocol, tmp_path / "cut", progress=False)
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    pd_full, pd_cut = full.run_dir.metrics(), resumed.run_dir.metrics()
    assert pd_full["value"].equals(pd_cut["value"])


def test_perfect_match_clamp_speeds_learning(tmp_path):
    """Qualitative (ANCHORS T4): giving the match step makes a single-head model learn sooner."""
    loss = {}
    for tag, extra in (("none", []), ("match", [{"kind": "set", "site": "pattern1", "heads": [0],
                                                 "to": "perfect_match"}])):
        data = fewshot_protocol(steps=120)
        data["train"]["lr"] = 3e-3
        data["measures"]["schedule"] = {"unit": "steps", "every": 20}
        data["clamps"] = [{"kind": "ablate", "site": "v1", "heads": [1, 2, 3]}, *extra]
        df = train(validate_protocol(data), tmp_path / tag, progress=False).run_dir.metrics()
        main = df[(df.split == "fsl_train") & (df.metric == "loss")].set_index("step")["value"]
        loss[tag] = main
    assert loss["match"].loc[60] < 0.5 * loss["none"].loc[60]
    assert loss["match"].iloc[-1] < loss["match"].iloc[0]


def test_a_run_plans_its_clamps_once(tmp_path, monkeypatch):
    # validation plans, and training, evaluation and the figures reuse that plan
    from optolab.protocol import schema

    calls = []
    real = schema.plan_clamps
    monkeypatch.setattr(schema, "plan_clamps", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = fewshot_protocol(steps=10)
    data["clamps"] = [{"kind": "ablate", "site": "v1", "heads": [0]}]
    optolab.run(write_protocol(tmp_path, data), tmp_path / "run", progress=False)
    assert len(calls) == 1
