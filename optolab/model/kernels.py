"""Speed tricks for the model's attention on CPU and under the compiler: the same math as the
plain formulas in :mod:`optolab.model.transformer`, written for a backend.

Rules:
- Which variant runs is chosen by flags: ``torch.compiler.is_compiling()`` (a public API: under
  ``torch.compile`` the broadcast forms fuse into loops) and :data:`PLAIN_KERNELS` (set by the
  ensemble trainer while it runs ``vmap`` over members, where the tricks do not pay). No private
  torch state is read.
- Every variant agrees with the plain formula up to float rounding (tests in ``test_model.py``).
- RoPE is interleaved (GPT-J style), as in the authors' JAX code; under the compiler it is real
  arithmetic (inductor has no complex kernels).
- Forward passes without gradients (evaluations, measures, probes) on a CPU take the model's
  weight products through oneDNN (:func:`product`); anything that trains keeps torch's BLAS
  product, so training trajectories do not depend on it.
"""

from __future__ import annotations

import contextvars
import platform

import torch
from jaxtyping import Float
from torch import Tensor


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


# --- weight products --------------------------------------------------------------------
# torch's float32 CPU product is MKL's sgemm, which on a non-Intel CPU takes a generic AVX2 path:
# ~100 GFLOP/s on this project's AMD EPYC (AVX-512) core, while oneDNN's matmul, which dispatches on
# the instruction set alone, runs the same products at ~240 (an eval's [3000, 512] @ [512, 64]:
# 1.9 ms -> 0.8 ms; measured, torch 2.13, one core). oneDNN ships inside torch's CPU build
# (``torch.backends.mkldnn``); its product reached through torch's public op namespace is
# ``mkldnn._linear_pointwise``, which inductor can only lower for frozen weights, so it is wrapped
# in an opaque custom op the compiler calls as it is. Only passes without gradients use it:
# training keeps MKL bit for bit (a trajectory, and so every published number, is unchanged),
# and an evaluation differs from the MKL product by float rounding (~1e-7 relative).
ONEDNN_MIN_ROWS = 256  # below this many rows the call's fixed cost eats the gain (measured)


@torch.library.custom_op("optolab::onednn_product", mutates_args=())
def onednn_product(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` for ``x [m, k]``, ``w [k, n]`` (any strides) through oneDNN's matmul."""
    return torch.ops.mkldnn._linear_pointwise(x, w.t(), None, "none", [], "")


@onednn_product.register_fake
def _(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


def _use_onednn(x: Tensor, w: Tensor) -> bool:
    if (torch.is_grad_enabled() or not ONEDNN or x.device.type != "cpu" or x.dtype != torch.float32
            or w.dtype != torch.float32 or w.dim() != 2 or x.numel() < ONEDNN_MIN_ROWS * x.shape[-1]
            or torch.is_autocast_enabled("cpu")):  # under autocast the product is autocast's (bf16)
        return False
    # compiled graphs are never traced under vmap without gradients; dynamo cannot read a ContextVar
    return torch.compiler.is_compiling() or not PLAIN_KERNELS.get()


def product(x: Float[Tensor, "... k"], w: Float[Tensor, "k n"]) -> Float[Tensor, "... n"]:
    """``x @ w``: oneDNN's product in passes without gradients on a CPU (see above), else torch's."""
    if _use_onednn(x, w):
        return onednn_product(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[-1])
    return x @ w


SHORT_ROW_KEYS = 8

# The short-context kernels below trade extra arithmetic for fewer, larger ops: right for one
# model, wrong under torch.func.vmap over ensemble members, where every op is already batched
# over members and the extra arithmetic (and strided copies) dominate. The ensemble trainer sets
# this for the duration of its training steps (optolab.training.ensemble); nothing else changes it.
PLAIN_KERNELS: contextvars.ContextVar[bool] = contextvars.ContextVar("optolab_plain_kernels", default=False)
# measured on x86-64 only (AVX-512); elsewhere torch's own product stays
ONEDNN = (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def fused_heads_product(z: Float[Tensor, "batch pos head d_head"], W_O: Tensor) -> Float[Tensor, "batch pos d_model"]:
    """The attention output without per-head results: one [b·n, h·e] @ [h·e, d] product."""
    b, n, h, e = z.shape
    return product(z.reshape(b, n, h * e), W_O.reshape(h * e, -1))


def per_head_results(z: Float[Tensor, "batch pos head d_head"], W_O: Tensor) -> Float[Tensor, "batch pos head d_model"]:
    """Each head's output, ``z[b,n,h] @ W_O[h]``: one [b·n, e] @ [e, d] product per head, batched."""
    b, n, h, e = z.shape
    return torch.bmm(z.reshape(b * n, h, e).transpose(0, 1), W_O).transpose(0, 1).reshape(b, n, h, -1)


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


