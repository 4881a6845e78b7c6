"""Olsson et al. (2022) probe measures, built from the model's own vocabulary.

Rules (positions stated, as the paper asks):
- Prefix-matching probe: ``BOS`` then ``L`` random ordinary tokens repeated 4 times, with
  ``L = min(25, (n_ctx − 1) // 4)``; the score averages, over queries in repeats 2–4, attention
  summed over the keys just after earlier occurrences of the query's token. Skipped if ``L < 2``.
- Copying: a head's direct path ``x → LN1 → W_V W_O → LN_final → W_U`` applied to each input
  embedding ``x`` (token ``t``: ``W_E[t]``; label ``l``: ``W_L[l]``); logits mean-subtracted and
  ReLU'd; ``s = relu_logit[t] / Σ relu_logits``; reported as ``2s − 1`` in [−1, 1] (1: raises
  only the attended token; −1: raises none of it). Unembedding biases are dropped.
- ICL score: loss at a late minus loss at an early target position, at Olsson's 500 and 50 of
  512 scaled to the positions that carry a loss (the indices are recorded in the summary).
"""

from __future__ import annotations

import torch
from torch import Tensor

from optolab.model.transformer import Transformer
from optolab.tasks.base import IGNORE, Batch, rng
from optolab.tasks.tokens import repeat_induction_targets

PROBE_REPEATS = 4


def repeat_probe(n_tokens: int, bos: int | None, n_ctx: int, n: int, seed: int) -> Batch | None:
    """Olsson's prefix-matching probe batch, or None if the context is too short."""
    prefix = 0 if bos is None else 1
    L = min(25, (n_ctx - prefix) // PROBE_REPEATS)
    if L < 2:
        return None
    g = rng(seed, 303)
    seg = torch.randint(n_tokens, (n, L), generator=g)
    parts = ([torch.full((n, 1), bos)] if bos is not None else []) + [seg.repeat(1, PROBE_REPEATS)]
    tokens = torch.cat(parts, dim=1)
    targets = torch.full_like(tokens, IGNORE)
    return Batch(inputs=(tokens,), targets=targets, tokens=tokens,
                 induction_targets=repeat_induction_targets(L, PROBE_REPEATS, prefix))


@torch.no_grad()
def copying_scores(model: Transformer, ids: Tensor) -> Tensor:
    """``[layer, head]`` copying scores for the input embeddings of ``ids`` (see module doc)."""
    cfg = model.cfg
    E = model.W_E if cfg.input_mode == "tokens" else model.W_L
    x = E[ids][None]  # [1, n, d_model] as a "residual stream"
    W_U = model.W_U
    scores = torch.empty(cfg.n_layers, cfg.n_heads, device=x.device)
    for layer, block in enumerate(model.blocks):
        h_in = block.ln1(x)
        v = torch.einsum("bnd,dhe->bnhe", h_in, block.attn.W_V)
        out = torch.einsum("bnhe,hed->bnhd", v, block.attn.W_O)  # [1, n, head, d_model]
        logits = model.ln_final(out) @ W_U  # [1, n, head, d_out]
        r = torch.relu(logits - logits.mean(-1, keepdim=True))
        own = r.gather(-1, ids[None, :, None, None].expand(1, -1, cfg.n_heads, 1)).squeeze(-1)
        s = own / r.sum(-1).clamp_min(1e-12)
        scores[layer] = (2 * s - 1).mean((0, 1))
    return scores


def icl_positions(target_positions: list[int]) -> tuple[int, int] | None:
    """Early/late positions for the ICL score among the positions that carry a loss."""
    if len(target_positions) < 2:
        return None
    m = len(target_positions) - 1
    early = target_positions[round(m * 50 / 511)]
    late = target_positions[round(m * 500 / 511)]
    return (early, late) if late > early else None
