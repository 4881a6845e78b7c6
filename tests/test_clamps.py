"""Clamp semantics on a tiny model: values written, gradients cut, multi-pass references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optolab.clamps.values import previous_token_pattern
from optolab.model.forward import PlainForward
from optolab.model.transformer import build_model
from optolab.protocol.loader import validate_protocol
from optolab.tasks import make_task
from optolab.training.trainer import make_forward, train
from tests.conftest import fewshot_protocol, repeat_protocol

P0, P1 = "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"


def setup(clamps, base=fewshot_protocol, engine="nnsight", **train):
    data = base(**train)
    data["clamps"] = clamps
    data["train"]["clamp_engine"] = engine
    protocol = validate_protocol(data)
    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    # the model is built on the CPU, so its Forward is made for the CPU whatever train.device says
    return protocol, task, build_model(cfg, 0), make_forward(protocol, task, cfg, torch.device("cpu")), \
        task.train_batch(0, 0, 16)


def loss_of(logits, batch):
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)


def grads(model, logits, batch):
    model.zero_grad(set_to_none=True)
    loss_of(logits, batch).backward()
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def plain(model, batch, sites):
    return PlainForward()(model, batch, save=sites)[1]


def hooked(model, batch, replace: dict):
    """Reference forward with plain PyTorch hooks: ``replace[site](out) -> new``."""
    mods = dict(model.named_modules())
    handles = [mods[s].register_forward_hook(lambda _m, _i, out, f=f: f(out)) for s, f in replace.items()]
    try:
        return model(*batch.inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.numerics
class TestValues:
    def test_previous_token_pattern_exact_and_cuts_qk_gradient(self):
        _, _, model, fwd, batch = setup([{"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token",
                                          "strength": 0.75}])
        logits, saved = fwd(model, batch, step=0, training=True, save=[P0])
        n = saved[P0].shape[-1]
        assert torch.equal(saved[P0][:, 2], previous_token_pattern(n, n, 0.75).expand(16, n, n))
        assert not torch.equal(saved[P0][:, 1], saved[P0][:, 2])  # other heads untouched
        g = grads(model, logits, batch)
        for w in ("W_Q", "W_K"):
            per_head = g[f"blocks.0.attn.{w}"].abs().sum(dim=(0, 2))
            assert per_head[2] == 0 and (per_head[[0, 1, 3]] > 0).all()
        assert g["blocks.0.attn.W_V"].abs().sum(dim=(0, 2))[2] > 0  # values still learn

    def test_perfect_match_sets_query_row_only(self):
        _, _, model, fwd, batch = setup([{"kind": "set", "site": "pattern1", "heads": [1], "to": "perfect_match",
                                          "strength": 0.8}])
        _, saved = fwd(model, batch, step=0, training=False, save=[P1])
        row = saved[P1][:, 1, -1]  # [batch, key]
        assert torch.allclose(row[batch.match_mask], torch.tensor(0.8))
        assert torch.allclose(row[batch.nonmatch_mask], torch.tensor(0.2))
        assert (row[~(batch.match_mask | batch.nonmatch_mask)] == 0).all()
        clean = plain(model, batch, [P1])
        assert torch.equal(saved[P1][:, 1, :-1], clean[P1][:, 1, :-1])  # earlier rows as computed
        assert torch.equal(saved[P1][:, 0], clean[P1][:, 0])  # other heads as computed

    @pytest.mark.parametrize("how", ["zero", "mean", "resample"])
    def test_ablate_values(self, how):
        _, _, model, fwd, batch = setup([{"kind": "ablate", "site": "v1", "heads": [0, 3], "how": how}])
        clean = plain(model, batch, ["blocks.1.attn.hook_v"])
        logits, saved = fwd(model, batch, step=0, training=True, save=["blocks.1.attn.hook_v"])
        v, c = saved["blocks.1.attn.hook_v"], clean["blocks.1.attn.hook_v"]
        want = {"zero": torch.zeros_like(c), "mean": c.mean(0, keepdim=True).expand_as(c), "resample": c.roll(1, 0)}[how]
        assert torch.allclose(v[:, :, [0, 3]], want[:, :, [0, 3]])
        assert torch.equal(v[:, :, [1, 2]], c[:, :, [1, 2]])
        g = grads(model, logits, batch)["blocks.1.attn.W_V"].abs().sum(dim=(0, 2))
        assert g[0] == 0 and g[3] == 0 and g[1] > 0

    def test_stop_gradient_forward_unchanged_no_gradient(self):
        _, _, model, fwd, batch = setup([{"kind": "stop_gradient", "site": "z0", "heads": [1]}])
        logits, _ = fwd(model, batch, step=0, training=True)
        ref = model(*batch.inputs)
        assert torch.equal(logits, ref)
        g = grads(model, logits, batch)
        assert g["blocks.0.attn.W_V"].abs().sum(dim=(0, 2))[1] == 0
        assert g["blocks.0.attn.W_V"].abs().sum(dim=(0, 2))[0] > 0

    def test_scale_is_a_temperature_on_scores(self):
        _, _, model, fwd, batch = setup([{"kind": "scale", "site": "scores1", "heads": [0], "factor": 0.0}])
        _, saved = fwd(model, batch, step=0, training=False, save=[P1])
        n = saved[P1].shape[-1]
        uniform = torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]
        assert torch.allclose(saved[P1][:, 0], uniform.expand(16, n, n))  # factor 0: uniform over the causal keys

    def test_add_and_constant_and_positions(self):
        _, _, model, fwd, batch = setup([{"kind": "add", "site": "resid_post0", "value": 1.5, "positions": "labels"},
                                         {"kind": "set", "site": "pattern0", "heads": [0], "to": "constant",
                                          "value": 0.25, "positions": [-1]}])
        clean = plain(model, batch, ["blocks.0.hook_resid_post"])
        _, saved = fwd(model, batch, step=0, training=False, save=["blocks.0.hook_resid_post", P0])
        diff = saved["blocks.0.hook_resid_post"] - clean["blocks.0.hook_resid_post"]
        assert torch.allclose(diff[:, [1, 3]], torch.tensor(1.5)) and (diff[:, [0, 2]] == 0).all()  # (4 changes: its pattern row is set)
        assert (saved[P0][:, 0, -1] == 0.25).all() and not (saved[P0][:, 0, -2] == 0.25).all()


@pytest.mark.numerics
class TestMultiPass:
    def test_pattern_preserving_ablation_matches_reference(self):
        clamps = [{"kind": "preserve", "site": "pattern0"}, {"kind": "preserve", "site": "pattern1"},
                  {"kind": "ablate", "site": "v0", "heads": [2]}]
        _, _, model, fwd, batch = setup(clamps)
        logits, saved = fwd(model, batch, step=0, training=True, save=[P1])
        rec = {}
        hooked(model, batch, {P0: lambda o: rec.setdefault(P0, o), P1: lambda o: rec.setdefault(P1, o)})
        zero_v = lambda o: torch.cat([o[:, :, :2], torch.zeros_like(o[:, :, 2:3]), o[:, :, 3:]], dim=2)  # noqa: E731
        ref = hooked(model, batch, {P0: lambda o: rec[P0], "blocks.0.attn.hook_v": zero_v, P1: lambda o: rec[P1]})
        assert torch.allclose(logits, ref, atol=1e-6)
        assert torch.equal(saved[P1], rec[P1].detach())  # patterns are the clean ones
        assert not torch.allclose(logits, model(*batch.inputs))  # and the value path did change

    def test_value_preserving_ablation_ablated_head_wins(self):
        clamps = [{"kind": "preserve", "site": "v0"}, {"kind": "preserve", "site": "v1"},
                  {"kind": "ablate", "site": "v0", "heads": [1]}]
        _, _, model, fwd, batch = setup(clamps)
        logits, saved = fwd(model, batch, step=0, training=False, save=["blocks.0.attn.hook_v", "blocks.1.attn.hook_v"])
        assert (saved["blocks.0.attn.hook_v"][:, :, 1] == 0).all()
        rec = {}
        hooked(model, batch, {"blocks.1.attn.hook_v": lambda o: rec.setdefault("v1", o)})
        assert torch.equal(saved["blocks.1.attn.hook_v"], rec["v1"].detach())

    def test_layer_clamp_three_pass_matches_reference(self):
        _, _, model, fwd, batch = setup([{"kind": "layer_clamp"}])
        logits, _ = fwd(model, batch, step=0, training=True)
        g = grads(model, logits, batch)
        rec = {}

        def shift(e):
            return torch.cat([e[:, :1], e[:, :-2], e[:, -1:]], dim=1)

        hooked(model, batch, {"hook_embed": lambda o: rec.setdefault("e", o),
                              "blocks.0.hook_resid_post": lambda o: shift(rec["e"]),
                              P1: lambda o: rec.setdefault("p", o)})
        rec2 = {}
        ref = hooked(model, batch, {"hook_embed": lambda o: rec2.setdefault("e", o),
                                    "blocks.0.hook_resid_post": lambda o: rec2["e"], P1: lambda o: rec["p"]})
        assert torch.allclose(logits, ref, atol=1e-6)
        g_ref = grads(model, ref, batch)
        for name in g:
            assert torch.allclose(g[name], g_ref[name], atol=1e-6), name
        assert all((g[n] == 0).all() for n in g if n.startswith("blocks.0."))  # layer 1 gets no gradient
        assert g["blocks.1.attn.W_Q"].abs().sum() > 0 and g["W_X"].abs().sum() > 0

    def test_perfect_copy_logits_are_head_scores(self):
        _, _, model, fwd, batch = setup([{"kind": "perfect_copy", "layer": 1, "head": 2}])
        logits, _ = fwd(model, batch, step=0, training=True)
        rec = {}
        hooked(model, batch, {"blocks.1.attn.hook_attn_scores": lambda o: rec.setdefault("s", o)})
        labels = batch.inputs[1]
        q = logits[:, -1]
        for b in range(4):
            for j, pos in enumerate((1, 3)):
                assert torch.allclose(q[b, labels[b, j]], rec["s"][b, 2, -1, pos])
            absent = [lab for lab in range(q.shape[-1]) if lab not in labels[b].tolist()]
            assert (q[b, absent] == -1e9).all()
        g = grads(model, logits, batch)
        per_head = g["blocks.1.attn.W_Q"].abs().sum(dim=(0, 2))
        assert per_head[2] > 0 and (per_head[[0, 1, 3]] == 0).all()
        assert (g["W_U"] == 0).all() and (g["blocks.1.attn.W_V"] == 0).all() and (g["blocks.1.attn.W_O"] == 0).all()

    def test_layer_clamp_with_copy_uses_shifted_pass_scores(self):
        _, _, model, fwd, batch = setup([{"kind": "layer_clamp", "copy_head": 0}])
        logits, _ = fwd(model, batch, step=0, training=True)
        rec = {}

        def shift(e):
            return torch.cat([e[:, :1], e[:, :-2], e[:, -1:]], dim=1)

        hooked(model, batch, {"hook_embed": lambda o: rec.setdefault("e", o),
                              "blocks.0.hook_resid_post": lambda o: shift(rec["e"]),
                              "blocks.1.attn.hook_attn_scores": lambda o: rec.setdefault("s", o)})
        labels = batch.inputs[1]
        assert torch.allclose(logits[torch.arange(16), -1, labels[:, 0]], rec["s"][:, 0, -1, 1])


def test_graft_takes_the_frozen_models_activation(tmp_path):
    from optolab.training.trainer import train

    donor = validate_protocol(fewshot_protocol(steps=10))
    train(donor, tmp_path / "donor", progress=False)
    _, _, model, fwd, batch = setup([{"kind": "graft", "site": "resid_post0", "source": str(tmp_path / "donor")}])
    _, saved = fwd(model, batch, step=0, training=False, save=["blocks.0.hook_resid_post"])
    from optolab.api import open_run

    frozen = open_run(tmp_path / "donor").model()
    rec = {}
    hooked(frozen, batch, {"blocks.0.hook_resid_post": lambda o: rec.setdefault("r", o)})
    assert torch.equal(saved["blocks.0.hook_resid_post"], rec["r"].detach())


def test_repeat_tokens_clamp_runs():
    _, _, model, fwd, batch = setup([{"kind": "set", "site": "pattern0", "to": "previous_token"}], base=repeat_protocol)
    _, saved = fwd(model, batch, step=0, training=False, save=[P0])
    assert saved[P0].shape[1] == 4 and torch.allclose(saved[P0].diagonal(-1, 2, 3), torch.tensor(1.0))


def test_a_finished_run_leaves_no_hooks_on_its_model(tmp_path):
    # site hooks are one mechanism with handles that are removed (hooks backend and compiled path)
    from optolab.model.transformer import HookPoint

    for engine, compiled in (("hooks", False), ("nnsight", True)):
        data = fewshot_protocol(steps=4, clamp_engine=engine, compile=compiled)
        data["clamps"] = [{"kind": "ablate", "site": "result1", "heads": [0]}]
        model = train(validate_protocol(data), tmp_path / f"{engine}{compiled}", progress=False).model
        hooked = [n for n, m in model.named_modules() if isinstance(m, HookPoint) and m._forward_hooks]
        assert hooked == [], (engine, compiled, hooked)
        assert all(b.attn.per_head_results for b in model.blocks)  # the flag is back to its default


@pytest.mark.numerics
class TestPathAblate:
    """``path_ablate``: one path loses the source, every other path keeps it."""

    @pytest.mark.parametrize("engine", ["nnsight", "hooks"])
    def test_on_the_whole_residual_it_is_the_plain_ablation(self, engine):
        _, _, model, fwd, batch = setup([{"kind": "path_ablate", "site": "resid_pre1", "without": "attn_out0"}],
                                        engine=engine)
        got = fwd(model, batch, step=0, training=False, save=[])[0]
        want = hooked(model, batch, {"blocks.0.hook_attn_out": torch.zeros_like})
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert not torch.allclose(got, model(*batch.inputs))

    @pytest.mark.parametrize("path", ["q", "k", "v"])
    def test_only_its_path_changes(self, path):
        sites = {p: f"blocks.1.attn.hook_{p}" for p in "qkv"}
        _, _, model, fwd, batch = setup([{"kind": "path_ablate", "site": f"{path}1", "without": "attn_out0"}])
        _, saved = fwd(model, batch, step=0, training=False, save=list(sites.values()))
        clean = plain(model, batch, list(sites.values()))
        mods = dict(model.named_modules())
        got = {}
        handles = [mods["blocks.0.hook_attn_out"].register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))]
        handles += [mods[s].register_forward_hook(lambda _m, _i, out, p=p: got.__setitem__(p, out))
                    for p, s in sites.items()]
        try:
            model(*batch.inputs)
        finally:
            for h in handles:
                h.remove()
        for p, s in sites.items():
            want = got[p] if p == path else clean[s]
            torch.testing.assert_close(saved[s], want, rtol=0, atol=1e-6)
            if p == path:
                assert not torch.allclose(saved[s], clean[s])

    def test_source_downstream_of_the_site_is_refused(self):
        from optolab.core.errors import OptolabError

        with pytest.raises(OptolabError, match="does not come before"):
            setup([{"kind": "path_ablate", "site": "k0", "without": "attn_out1"}])
