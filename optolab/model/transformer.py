"""A plain decoder-only transformer with TransformerLens-named hook points.

Rules:
- Every activation a clamp may touch passes through an identity :class:`HookPoint` whose module
  path is its TransformerLens name (``blocks.0.attn.hook_pattern``), so nnsight can read and
  write it as ``model.blocks[0].attn.hook_pattern.output``. Every hook point fires on every
  forward pass, in the order declared below.
- Heads are a tensor axis, never separate modules: q/k/v/z are ``[batch, pos, head, d_head]``,
  scores and patterns ``[batch, head, query_pos, key_pos]``, per-head results
  ``[batch, pos, head, d_model]``.
- The attention's inner products, softmax and RoPE come from :mod:`optolab.model.kernels`, which
  picks a form for the backend (eager CPU, the compiler, ensembles) by flags; results agree up to
  float rounding. ``hook_result`` fires when ``Attention.per_head_results`` is on (the default;
  the compiled path and ensembles turn it off where no clamp needs it).
- ``hook_q`` and ``hook_k`` are taken before RoPE (as in TransformerLens); ``hook_k`` is taken
  after key smearing, so it shows the keys the head actually matches against (pre-rotation).
- Two input modes. ``tokens``: ids ``[batch, pos]``. ``exemplar_label``: exemplar vectors
  ``[batch, n_ex, d_input]`` through a linear map with bias, and label ids ``[batch, n_lab]``
  through a one-hot → linear embedding, interleaved as ``x1 l1 x2 l2 … q`` (``n_ex`` is
  ``n_lab`` or ``n_lab + 1``).
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from optolab.model import kernels
from optolab.model.config import ModelConfig


class HookPoint(nn.Module):
    """Identity. Exists so an activation has a module name that nnsight can intercept."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class LayerNorm(nn.Module):
    eps = 1e-5

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.hook_normalized(F.layer_norm(x, x.shape[-1:], self.w, self.b, eps=self.eps))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        # Stored [d_model, head, d_head] / [head, d_head, d_model] so the head split is a free view.
        self.W_Q = nn.Parameter(torch.empty(d, h, e))
        self.W_K = nn.Parameter(torch.empty(d, h, e))
        self.W_V = nn.Parameter(torch.empty(d, h, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        if cfg.qkv_bias:
            self.b_Q = nn.Parameter(torch.zeros(h, e))
            self.b_K = nn.Parameter(torch.zeros(h, e))
            self.b_V = nn.Parameter(torch.zeros(h, e))
            self.b_O = nn.Parameter(torch.zeros(d))
        if cfg.smeared_keys:
            # sigma(alpha) is the weight on a key's own position; alpha = 0 starts at an even mix.
            self.smear_alpha = nn.Parameter(torch.zeros(h))
        if cfg.positional == "rope":
            table = kernels.rotary_table(cfg.n_ctx, e, cfg.rope_base)
            self.register_buffer("rope", table, persistent=False)
            self.register_buffer("rope_cos", table.real.contiguous(), persistent=False)  # for the compiler
            self.register_buffer("rope_sin", table.imag.contiguous(), persistent=False)
        mask = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)  # True above the diagonal
        self.scale = 1.0 / math.sqrt(e)

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]  (pre-RoPE)
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]  (pre-RoPE, post-smear)
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]  (masked: -inf)
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]
        # Whether hook_result fires (each head's output computed apart): on by default, so nnsight
        # users see it; the compiled path and ensembles turn it off where no clamp needs it
        # (optolab.model.hooks.SiteHooks), which saves a product per head.
        self.per_head_results = True

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        b, n, d = x.shape
        h, e = cfg.n_heads, cfg.d_head
        q = kernels.product(x, self.W_Q.view(d, h * e)).view(b, n, h, e)
        k = kernels.product(x, self.W_K.view(d, h * e)).view(b, n, h, e)
        v = kernels.product(x, self.W_V.view(d, h * e)).view(b, n, h, e)
        if cfg.qkv_bias:
            q, k, v = q + self.b_Q, k + self.b_K, v + self.b_V
        if cfg.smeared_keys:
            own = torch.sigmoid(self.smear_alpha)[:, None]  # [head, 1]
            k_prev = torch.cat([k[:, :1], k[:, :-1]], dim=1)  # position 0 keeps its own key
            k = own * k + (1 - own) * k_prev
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cfg.positional == "rope":
            q = kernels.apply_rotary(q, self.rope, self.rope_cos, self.rope_sin)
            k = kernels.apply_rotary(k, self.rope, self.rope_cos, self.rope_sin)

        masked = self.causal_mask[:n, :n]
        scores = kernels.per_head_scores(q, k) * self.scale  # q·k per head
        scores = self.hook_attn_scores(scores.masked_fill(masked, float("-inf")))
        pattern = self.hook_pattern(kernels.causal_softmax(scores))
        z = self.hook_z(kernels.per_head_mix(pattern, v))  # Σ_k pattern[h,q,k] v[k,h]
        if self.per_head_results:  # each head's output, for clamps and readers; they sum to the output
            out = self.hook_result(kernels.per_head_results(z, self.W_O)).sum(dim=2)
        else:
            out = kernels.fused_heads_product(z, self.W_O)
        return out + self.b_O if cfg.qkv_bias else out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(kernels.product(x, self.W_in) + self.b_in)
        post = self.hook_post(F.gelu(pre))
        return kernels.product(post, self.W_out) + self.b_out


class Block(nn.Module):
    # Submodules are declared in forward order, so ``named_modules()`` lists hooks as they fire.
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]  (equals resid_post if attn-only)
        if not cfg.attn_only:
            self.ln2 = LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
            self.mlp = MLP(cfg)
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid))))
        if hasattr(self, "mlp"):
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)


class Transformer(nn.Module):
    """Decoder-only, causal. ``forward(tokens)`` or ``forward(exemplars, labels)`` → logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        if cfg.input_mode == "tokens":
            self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        else:
            self.W_X = nn.Parameter(torch.empty(cfg.d_input, cfg.d_model))  # exemplar map
            self.b_X = nn.Parameter(torch.zeros(cfg.d_model))
            self.W_L = nn.Parameter(torch.empty(cfg.n_labels, cfg.d_model))  # one-hot -> linear
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional == "learned":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model) if cfg.final_ln else nn.Identity()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_out))
        if cfg.unembed_bias:
            self.b_U = nn.Parameter(torch.zeros(cfg.d_out))

    def embed(self, x: Tensor, labels: Tensor | None = None) -> Float[Tensor, "batch pos d_model"]:
        if self.cfg.input_mode == "tokens":
            return self.W_E[x]
        if labels is None:
            raise ValueError("exemplar_label models take forward(exemplars, labels)")
        ex: Float[Tensor, "batch n_ex d_model"] = kernels.product(x, self.W_X) + self.b_X
        lab: Float[Tensor, "batch n_lab d_model"] = self.W_L[labels]
        n_lab = lab.shape[1]
        pairs = einops.rearrange(torch.stack([ex[:, :n_lab], lab], dim=2), "b n two d -> b (n two) d")
        return torch.cat([pairs, ex[:, n_lab:]], dim=1)

    def forward(self, x: Tensor, labels: Int[Tensor, "batch n_lab"] | None = None) -> Float[Tensor, "batch pos d_out"]:
        resid = self.hook_embed(self.embed(x, labels))
        if self.cfg.positional == "learned":
            resid = resid + self.hook_pos_embed(self.W_pos[: resid.shape[1]].expand_as(resid))
        if resid.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequence of length {resid.shape[1]} exceeds n_ctx={self.cfg.n_ctx}")
        for block in self.blocks:
            resid = block(resid)
        logits = kernels.product(self.ln_final(resid), self.W_U)
        return logits + self.b_U if self.cfg.unembed_bias else logits

    # --- introspection -----------------------------------------------------------------

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by TransformerLens name, in the order they fire."""
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> Transformer:
    """Deterministic init from ``seed``, following the authors' JAX models (Singh et al. 2024).

    Matrices: LeCun normal, i.e. normal truncated at ±2σ rescaled to std 1/sqrt(fan_in), with
    fan-in d_model for W_Q/K/V/O (the fused 64→64 projections) and W_U, d_input for the exemplar
    map. Embeddings (labels, tokens, learned positions): 0.02 × a ±2-truncated standard normal.
    Biases and LayerNorm start at 0 and 1. ``init_std`` overrides the matrix std.
    """
    gen = torch.Generator().manual_seed(int(seed))
    cfg = model.cfg
    fan_in = {
        "W_Q": cfg.d_model, "W_K": cfg.d_model, "W_V": cfg.d_model, "W_O": cfg.d_model,
        "W_U": cfg.d_model, "W_X": cfg.d_input, "W_in": cfg.d_model, "W_out": cfg.d_mlp,
    }
    embed_std = 0.02  # W_L, W_E, W_pos: the authors' label embedding, GPT-2's token embedding
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in fan_in:
            std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(fan_in[leaf])
            p.copy_(_trunc_normal(p.shape, std, gen))
        elif leaf in {"W_L", "W_E", "W_pos"}:
            p.copy_(_trunc_normal(p.shape, embed_std * 0.87962566103423978, gen))
    return model


def _trunc_normal(shape: torch.Size, std: float, gen: torch.Generator) -> Tensor:
    """Normal(0, std²) truncated at ±2 std, rescaled so the std is ``std`` (as haiku does)."""
    x = torch.empty(shape)
    torch.nn.init.trunc_normal_(x, 0.0, 1.0, -2.0, 2.0, generator=gen)
    return x * (std / 0.87962566103423978)


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    return init_weights(Transformer(cfg), seed)
