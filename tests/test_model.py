"""The model: hook names and shapes, every hook fires, RoPE / LN / smeared keys / causality."""

from __future__ import annotations

import math

import pytest
import torch
from nnsight import NNsight

from optolab.model import kernels
from optolab.model.kernels import apply_rotary, causal_softmax, per_head_mix, per_head_scores, rotary_table
from optolab.model.transformer import HookPoint, build_model
from tests.conftest import tiny_config

CONFIGS = {
    "tokens-rope-attnonly": dict(),
    "tokens-learned-mlp": dict(positional="learned", attn_only=False, d_mlp=32),
    "tokens-none-noln": dict(positional="none", layer_norm=False, final_ln=False),
    "tokens-smeared": dict(smeared_keys=True, qkv_bias=True),
    "exemplar-rope": dict(input_mode="exemplar_label", d_vocab=0, d_input=12, n_labels=5, d_out=5, n_ctx=5),
}


def inputs_for(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if cfg.input_mode == "tokens":
        return (torch.randint(cfg.d_vocab, (batch, cfg.n_ctx), generator=g),)
    n_lab = (cfg.n_ctx - 1) // 2
    return (torch.randn(batch, n_lab + 1, cfg.d_input, generator=g), torch.randint(cfg.n_labels, (batch, n_lab), generator=g))


def expected_hooks(cfg):
    names = ["hook_embed"] + (["hook_pos_embed"] if cfg.positional == "learned" else [])
    for L in range(cfg.n_layers):
        names += [f"blocks.{L}.hook_resid_pre"] + ([f"blocks.{L}.ln1.hook_normalized"] if cfg.layer_norm else [])
        names += [f"blocks.{L}.attn.hook_{n}" for n in ("q", "k", "v", "attn_scores", "pattern", "z", "result")]
        names += [f"blocks.{L}.hook_attn_out", f"blocks.{L}.hook_resid_mid"]
        if not cfg.attn_only:
            names += ([f"blocks.{L}.ln2.hook_normalized"] if cfg.layer_norm else [])
            names += [f"blocks.{L}.mlp.hook_pre", f"blocks.{L}.mlp.hook_post", f"blocks.{L}.hook_mlp_out"]
        names += [f"blocks.{L}.hook_resid_post"]
    return names + (["ln_final.hook_normalized"] if cfg.final_ln else [])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_hook_fires_once_in_forward_order_with_its_shape(name):
    cfg = tiny_config(**CONFIGS[name])
    model = build_model(cfg, 0)
    fired = []
    for hook_name, m in model.hook_points().items():
        m.register_forward_hook(lambda _m, _i, out, n=hook_name: fired.append((n, tuple(out.shape))))
    b, h, p, d, e = 3, cfg.n_heads, cfg.n_ctx, cfg.d_model, cfg.d_head
    logits = model(*inputs_for(cfg, b))
    assert logits.shape == (b, p, cfg.d_out)
    assert [n for n, _ in fired] == expected_hooks(cfg) == list(model.hook_points())
    shapes = dict(fired)
    for L in range(cfg.n_layers):
        for k in ("q", "k", "v", "z"):
            assert shapes[f"blocks.{L}.attn.hook_{k}"] == (b, p, h, e)
        assert shapes[f"blocks.{L}.attn.hook_pattern"] == (b, h, p, p)
        assert shapes[f"blocks.{L}.attn.hook_attn_scores"] == (b, h, p, p)
        assert shapes[f"blocks.{L}.attn.hook_result"] == (b, p, h, d)
        assert shapes[f"blocks.{L}.hook_resid_post"] == (b, p, d)


def test_hooks_are_identities_and_nnsight_can_write_one():
    cfg = tiny_config()
    model = build_model(cfg, 0)
    assert all(isinstance(m, HookPoint) for m in model.hook_points().values())
    x = inputs_for(cfg)
    clean = model(*x)
    nn_model = NNsight(model)
    with nn_model.trace(*x):
        pattern = nn_model.blocks[1].attn.hook_pattern.output.clone()
        pattern[:] = torch.eye(cfg.n_ctx)  # every query attends to itself
        nn_model.blocks[1].attn.hook_pattern.output = pattern
        logits = nn_model.output.save()
    assert not torch.allclose(logits, clean)
    with nn_model.trace(*x):
        same = nn_model.output.save()
    torch.testing.assert_close(same, clean)


def test_attention_is_causal():
    cfg = tiny_config()
    model = build_model(cfg, 1)
    (tokens,) = inputs_for(cfg)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.d_vocab
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("n", [6, 40])  # 40 positions: the plain-matmul and last-axis softmax branches
def test_fast_attention_helpers_match_einsum(n):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 4, 5, generator=g) for _ in range(3))
    torch.testing.assert_close(per_head_scores(q, k), torch.einsum("bqhe,bkhe->bhqk", q, k))
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k).masked_fill(mask, float("-inf"))
    pattern = causal_softmax(scores)
    torch.testing.assert_close(pattern, torch.softmax(scores, -1))
    torch.testing.assert_close(per_head_mix(pattern, v), torch.einsum("bhqk,bkhe->bqhe", pattern, v))
    extreme = scores * 1e3  # exp underflow: still a distribution with exact zeros above the diagonal
    p = causal_softmax(extreme)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4, n))
    assert (p.masked_select(mask) == 0).all()


def test_rope_rotates_pairs_and_depends_only_on_relative_position():
    d, n = 8, 7
    table = rotary_table(n, d, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 1, d, generator=g)

    def at(x, p):
        return apply_rotary(x.expand(1, n, 1, d), table)[0, p, 0]

    # relative-position property: <R_i q, R_j k> depends on i - j only
    assert torch.allclose(at(q, 3) @ at(k, 1), at(q, 5) @ at(k, 3), atol=1e-5)
    assert torch.allclose(at(q, 0), q.flatten())  # position 0 is not rotated
    # interleaved (GPT-J) convention: pair (0, 1) turns by exactly 1 radian per position
    x = torch.zeros(1, 1, 1, d)
    x[..., 0] = 1.0
    rotated = at(x, 1)
    assert torch.allclose(rotated[:2], torch.tensor([math.cos(1.0), math.sin(1.0)]), atol=1e-6)
    assert torch.allclose(rotated.norm(), torch.tensor(1.0))


def test_layer_norm_normalizes_before_its_affine():
    cfg = tiny_config()
    model = build_model(cfg, 0)
    seen = {}
    model.ln_final.hook_normalized.register_forward_hook(lambda _m, _i, out: seen.setdefault("x", out))
    model(*inputs_for(cfg))
    x = seen["x"]  # w = 1, b = 0 at init
    torch.testing.assert_close(x.mean(-1), torch.zeros(x.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.var(-1, unbiased=False), torch.ones(x.shape[:-1]), atol=1e-3, rtol=0)


def test_smeared_keys_with_sigma_one_equal_vanilla_attention_and_mix_otherwise():
    plain = build_model(tiny_config(), 0)
    smeared = build_model(tiny_config(smeared_keys=True), 0)
    smeared.load_state_dict({**plain.state_dict(), **{k: v for k, v in smeared.state_dict().items() if "smear" in k}})
    x = inputs_for(tiny_config())
    with torch.no_grad():
        for block in smeared.blocks:
            block.attn.smear_alpha.fill_(50.0)  # sigma = 1: no smear
    torch.testing.assert_close(smeared(*x), plain(*x))
    # sigma(alpha) = 0.25 at one head: k_j = 0.25 k_j + 0.75 k_{j-1}, position 0 keeps its own key
    keys = {}
    plain.blocks[0].attn.hook_k.register_forward_hook(lambda _m, _i, out: keys.setdefault("plain", out))
    smeared.blocks[0].attn.hook_k.register_forward_hook(lambda _m, _i, out: keys.setdefault("smeared", out))
    with torch.no_grad():
        smeared.blocks[0].attn.smear_alpha.fill_(math.log(0.25 / 0.75))
    plain(*x), smeared(*x)
    k, ks = keys["plain"], keys["smeared"]
    torch.testing.assert_close(ks[:, 1:], 0.25 * k[:, 1:] + 0.75 * k[:, :-1])
    torch.testing.assert_close(ks[:, 0], k[:, 0])


def test_init_is_deterministic_per_seed_and_matches_the_papers_parameter_count():
    cfg = tiny_config(input_mode="exemplar_label", d_vocab=0, d_input=512, n_labels=5, d_out=5, n_ctx=5,
                      n_heads=8, d_model=64, d_head=8)
    a, b, c = build_model(cfg, 3), build_model(cfg, 3), build_model(cfg, 4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_X, c.W_X)
    assert sum(p.numel() for p in a.parameters()) == 66_629  # ANCHORS §1: ≈66.6k


def test_bad_shapes_are_refused_with_the_field_named():
    from optolab.core.errors import OptolabError

    with pytest.raises(OptolabError, match="model.d_head"):
        tiny_config(d_head=3).validate()


@pytest.mark.skipif(not kernels.ONEDNN, reason="torch built without oneDNN")
def test_weight_products_use_onednn_only_without_gradients():
    """Evaluations take oneDNN's product (float rounding away from torch's); anything with
    gradients takes torch's own product bit for bit, so training does not depend on it."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 2, 64, generator=g), torch.randn(64, 48, generator=g)
    with torch.no_grad():
        fast = kernels.product(x, w)
        assert kernels._use_onednn(x, w) and not kernels._use_onednn(x[:10], w)  # few rows: torch's
        assert torch.equal(kernels.product(x[:10], w), x[:10] @ w)
    torch.testing.assert_close(fast, x @ w, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, kernels.onednn_product(x.reshape(-1, 64), w).view(300, 2, 48))  # deterministic
    xg = x.clone().requires_grad_(True)
    assert not kernels._use_onednn(xg, w) and torch.equal(kernels.product(xg, w), x @ w)
    assert not kernels._use_onednn(x.double(), w.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels._use_onednn(x, w) and kernels.product(x, w).dtype == torch.bfloat16


@pytest.mark.skipif(not kernels.ONEDNN, reason="torch built without oneDNN")
def test_a_model_evaluates_through_onednn_within_float_rounding(monkeypatch):
    cfg = tiny_config(**CONFIGS["tokens-learned-mlp"])
    model = build_model(cfg, 0)
    (tokens,) = inputs_for(cfg, batch=400)
    calls = []
    real = kernels.onednn_product
    monkeypatch.setattr(kernels, "onednn_product", lambda x, w: calls.append(x.shape) or real(x, w))
    with torch.no_grad():
        fast = model(tokens)
        assert len(calls) == 2 * (3 + 2) + 1  # per layer Q, K, V, W_in, W_out; the unembedding
        monkeypatch.setattr(kernels, "ONEDNN", False)
        plain = model(tokens)
    assert len(calls) == 11
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    logits = model(tokens)  # with gradients: torch's product, bit for bit what it was
    monkeypatch.setattr(kernels, "ONEDNN", True)
    assert torch.equal(model(tokens), logits) and len(calls) == 11
