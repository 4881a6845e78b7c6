"""A plain decoder-only transformer with TransformerLens-named hook points.

Rules:
- Every activation a clamp may touch passes through an identity :class:`HookPoint` whose module
  path is its TransformerLens name (``blocks.0.attn.hook_pattern``), so nnsight can read and
  write it as ``model.blocks[0].attn.hook_pattern.output``. Every hook point fires on every
  forward pass, in the order declared below.
- Heads are a tensor axis, never separate modules: q/k/v/z are ``[batch, pos, head, d_head]``,
  scores and patterns ``[batch, head, query_pos, key_pos]``, per-head results
  ``[batch, pos, head, d_model]``.
- Under ``torch.compile`` (:mod:`optolab.compiled`) the same math is written for the compiler:
  RoPE in real arithmetic (inductor has no complex kernels) and short-context attention as
  broadcast products that inductor fuses into loops; results agree with eager up to float
  rounding. ``hook_result`` fires only when something listens there under the compiler or the
  ensemble trainer (otherwise the heads' output projections are one fused product).
- ``hook_q`` and ``hook_k`` are taken before RoPE (as in TransformerLens); ``hook_k`` is taken
  after key smearing, so it shows the keys the head actually matches against (pre-rotation).
- Two input modes. ``tokens``: ids ``[batch, pos]``. ``exemplar_label``: exemplar vectors
  ``[batch, n_ex, d_input]`` through a linear map with bias, and label ids ``[batch, n_lab]``
  through a one-hot → linear embedding, interleaved as ``x1 l1 x2 l2 … q`` (``n_ex`` is
  ``n_lab`` or ``n_lab + 1``).
"""

from __future__ import annotations

import contextvars
import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from optolab.config import ModelConfig


class HookPoint(nn.Module):
    """Identity. Exists so an activation has a module name that nnsight can intercept."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class LayerNorm(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.hook_normalized(F.layer_norm(x, x.shape[-1:], self.w, self.b, eps=1e-5))


def rotary_table(n_ctx: int, d_head: int, base: float) -> Tensor:
    """Complex rotations ``[n_ctx, d_head // 2]`` for interleaved (GPT-J style) RoPE.

    Dimension pair (2i, 2i+1) at position p turns by p · base^(-2i/d_head), as in the authors'
    JAX code; the pair is treated as one complex number so the rotation is one multiply.
    """
    inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    angles = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary(x: Float[Tensor, "batch pos head d_head"], table: Tensor,
                 cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    if cos is not None and torch.compiler.is_compiling():  # the same rotation in real arithmetic
        n = x.shape[1]
        c, s = cos[:n, None, :], sin[:n, None, :]  # [pos, 1, d_head/2]
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # [batch, pos, head, d_head/2]
    return torch.view_as_real(pairs * table[: x.shape[1], None, :]).flatten(-2)


SHORT_ROW_KEYS = 8

# The short-context kernels below trade extra arithmetic for fewer, larger ops: right for one
# model, wrong under torch.func.vmap over ensemble members, where every op is already batched
# over members and the extra arithmetic (and strided copies) dominate. The ensemble trainer sets
# this for the duration of its training steps (optolab.ensemble); nothing else changes it.
PLAIN_KERNELS: contextvars.ContextVar[bool] = contextvars.ContextVar("optolab_plain_kernels", default=False)


def causal_softmax(scores: Float[Tensor, "batch head q_pos k_pos"]) -> Tensor:
    """Softmax over keys. For rows of a few keys it is taken over the second-to-last axis of the
    transposed scores: torch's last-axis kernel cannot vectorise such short rows and is ~2×
    slower forward and backward on CPU; from ~16 keys on the plain kernel wins (1.6–2.5× at
    65–256 keys; measured, torch 2.13, AVX-512). Masked (−inf) keys get exactly 0."""
    if scores.shape[-1] > SHORT_ROW_KEYS:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores.transpose(-1, -2), dim=-2).transpose(-1, -2)


# Above this many (query position × head) rows the all-pairs trick below costs more than it saves
# (measured, one core: 2.5-3x slower at 65 positions × 4 heads and 100 × 2; equal at 256 × 1).
ALL_PAIRS_MAX = 128


# Under torch.compile, attention over at most this many positions is a broadcast product and a sum
# (inductor fuses it into one loop; ~1.2x faster per training step than BLAS calls on such tiny
# matrices, measured on the main config); longer contexts keep the matmul.
POINTWISE_MAX_POS = 32


def _pointwise(n: int) -> bool:
    return n <= POINTWISE_MAX_POS and torch.compiler.is_compiling()


def per_head_scores(q: Float[Tensor, "batch q_pos head d_head"],
                    k: Float[Tensor, "batch k_pos head d_head"]) -> Float[Tensor, "batch head q_pos k_pos"]:
    """q·k for every head. One [q·h, e] @ [e, k·h] matmul per sequence, keeping the head-diagonal
    blocks: for short contexts this is ~2× faster (forward + backward) than a [batch·head]-batched
    matmul of tiny matrices. Longer contexts use the plain per-head matmul."""
    b, nq, h, e = q.shape
    nk = k.shape[1]
    if _pointwise(nk):  # a broadcast product the compiler fuses with the mask and the softmax;
        # taken in this layout, its backward kernels ran 1.6x faster (measured, main config)
        qt, kt = q.permute(1, 3, 0, 2), k.permute(1, 3, 0, 2)  # [pos, d_head, batch, head]
        return (qt[:, None] * kt[None]).sum(2).permute(2, 3, 0, 1)
    if torch.compiler.is_compiling() or nq * h > ALL_PAIRS_MAX or PLAIN_KERNELS.get():
        # the all-pairs trick's h× wasted work does not pay: plain matmul
        return torch.matmul(q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1))
    allpairs = torch.bmm(q.reshape(b, nq * h, e), k.reshape(b, nk * h, e).transpose(1, 2))
    return torch.diagonal(allpairs.view(b, nq, h, nk, h), dim1=2, dim2=4).permute(0, 3, 1, 2).contiguous()


def per_head_mix(pattern: Float[Tensor, "batch head q_pos k_pos"],
                 v: Float[Tensor, "batch k_pos head d_head"]) -> Float[Tensor, "batch q_pos head d_head"]:
    """z[b,q,h] = Σ_k pattern[b,h,q,k] v[b,k,h]: one [h·q, k] @ [k, h·e] matmul per sequence,
    keeping the head-diagonal blocks (same trick and reason as :func:`per_head_scores`)."""
    b, h, nq, nk = pattern.shape
    if _pointwise(nk):
        pt, vt = pattern.permute(2, 3, 0, 1), v.permute(1, 3, 0, 2)  # [q, k, batch, head], [k, e, batch, head]
        return (pt[:, :, None] * vt[None]).sum(1).permute(2, 0, 3, 1)
    if torch.compiler.is_compiling() or nq * h > ALL_PAIRS_MAX or PLAIN_KERNELS.get():
        return torch.matmul(pattern, v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    allpairs = torch.bmm(pattern.reshape(b, h * nq, nk), v.reshape(b, nk, -1))  # [b, h·q, h'·e]
    return torch.diagonal(allpairs.view(b, h, nq, h, -1), dim1=1, dim2=3).permute(0, 1, 3, 2).contiguous()


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
            table = rotary_table(cfg.n_ctx, e, cfg.rope_base)
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

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        b, n, d = x.shape
        h, e = cfg.n_heads, cfg.d_head
        q = (x @ self.W_Q.view(d, h * e)).view(b, n, h, e)
        k = (x @ self.W_K.view(d, h * e)).view(b, n, h, e)
        v = (x @ self.W_V.view(d, h * e)).view(b, n, h, e)
        if cfg.qkv_bias:
            q, k, v = q + self.b_Q, k + self.b_K, v + self.b_V
        if cfg.smeared_keys:
            own = torch.sigmoid(self.smear_alpha)[:, None]  # [head, 1]
            k_prev = torch.cat([k[:, :1], k[:, :-1]], dim=1)  # position 0 keeps its own key
            k = own * k + (1 - own) * k_prev
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cfg.positional == "rope":
            q = apply_rotary(q, self.rope, self.rope_cos, self.rope_sin)
            k = apply_rotary(k, self.rope, self.rope_cos, self.rope_sin)

        masked = self.causal_mask[:n, :n]
        scores = per_head_scores(q, k) * self.scale
        scores = self.hook_attn_scores(scores.masked_fill(masked, float("-inf")))
        pattern = self.hook_pattern(causal_softmax(scores))
        z = self.hook_z(per_head_mix(pattern, v))
        # Per-head results exist for clamps (their sum over heads is the attention output):
        # one [b·q, e] @ [e, d] matmul per head, batched over heads.
        if (torch.compiler.is_compiling() or PLAIN_KERNELS.get()) and not self.hook_result._forward_hooks:
            # nothing listens at hook_result (the ensemble trainer's and the compiled path's hooks
            # register there when a clamp does): one [b·n, h·e] @ [h·e, d] product instead of h
            # per-head ones
            out = z.reshape(b, n, h * e) @ self.W_O.reshape(h * e, d)
        else:
            result = torch.bmm(z.reshape(b * n, h, e).transpose(0, 1), self.W_O).transpose(0, 1)
            out = self.hook_result(result.reshape(b, n, h, d)).sum(dim=2)
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
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        post = self.hook_post(F.gelu(pre))
        return post @ self.W_out + self.b_out


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
        ex: Float[Tensor, "batch n_ex d_model"] = x @ self.W_X + self.b_X
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
        logits = self.ln_final(resid) @ self.W_U
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
