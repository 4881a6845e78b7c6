"""Composition scores (Elhage et al. 2021) between every head pair in layers l < l'.

comp_X(h → h') = ‖W_O^h W_X^{h'}‖_F / (‖W_O^h‖_F ‖W_X^{h'}‖_F) for X ∈ {Q, K, V}: how much of
what head h writes can head h' read through its query, key or value. LayerNorms are ignored,
as is usual. Range [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from optolab.model.transformer import Transformer


@torch.no_grad()
def composition_scores(model: Transformer) -> dict[str, Tensor]:
    """``{"comp_q"|"comp_k"|"comp_v": [src_layer, src_head, dst_layer, dst_head]}``;
    entries with ``src_layer >= dst_layer`` are NaN."""
    blocks = model.blocks
    L, H = len(blocks), model.cfg.n_heads
    out = {}
    for name in ("Q", "K", "V"):
        scores = torch.full((L, H, L, H), float("nan"), device=blocks[0].attn.W_O.device)
        for src in range(L):
            W_O = blocks[src].attn.W_O  # [head, d_head, d_model]
            o_norm = W_O.flatten(1).norm(dim=1)  # [head]
            for dst in range(src + 1, L):
                W_X = getattr(blocks[dst].attn, f"W_{name}")  # [d_model, head, d_head]
                prod = torch.einsum("hed,dgf->hgef", W_O, W_X)  # [src_head, dst_head, e, f]
                x_norm = W_X.permute(1, 0, 2).flatten(1).norm(dim=1)  # [head]
                scores[src, :, dst, :] = prod.flatten(2).norm(dim=2) / (o_norm[:, None] * x_norm[None, :])
        out[f"comp_{name.lower()}"] = scores
    return out
