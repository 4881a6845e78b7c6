"""``icl_copying``: the in-context copying score — Olsson et al.'s copying ratio computed on the
residual the head actually reads at the label tokens it attends to (exemplar–label tasks).

Olsson's direct-path score (``copying``, :mod:`optolab.measures.probes`) pushes a label's bare
*embedding* through a head's OV circuit. In the Singh task a label's identity reaches layer 2
through layer 1's outputs, not through the bare embedding, so the strongest induction heads
score ≤ 0 there (a head with induction strength 0.92 scored −0.55). This score asks the same
question of the input the head really has:

- On the main eval split of an exemplar–label task (one split keeps the cost small: ~3 ms per
  eval of 1000 sequences on the main config, one core), for each sequence and head, take the
  head's layer input (the residual the layer reads, through the block's LayerNorm) at every label
  token of the context, apply the head's OV circuit (``W_V`` then ``W_O``), the final LayerNorm
  and the unembedding: logits over labels, one vector per label token (:func:`head_logits` takes
  them from the values without materialising each head's output).
- Olsson's ratio on each: ``s = relu(l_own − mean l) / Σ relu(l − mean l)`` for the label that
  token carries, mapped to ``2s − 1`` (1: the head copies that label, −1: it suppresses it).
- Average over the label tokens weighted by the head's attention from the query to them (as the
  head reads them), then over sequences. One row per head of every layer; the activations are
  those the eval already saved (no extra forward pass).

Baseline (a head with no role): a head whose output at a label token carries nothing about that
token's label scores ``2/N − 1`` in expectation (:func:`chance`), ``N`` the number of labels the
unembedding scores, not 0: with the logits independent of the label, each label is the own label
equally often and the shares sum to 1, so the own share averages ``1/N``. For the Singh task's 5
labels that is −0.6. Heads in a trained model are not at chance for other reasons (a head may
write a fixed preference for some labels, or suppress the label it reads): on the main run
(c9baccf) induction heads score 0.77–0.84 (Spearman 0.98 with induction strength) while the
non-induction heads range from −0.89 to +0.46, and heads reach 0.32 on the plateau, before any
induction. Read the score as a ranking of heads, against the same head before its role formed,
never against 0 (docs/measures.md#which-copying-score-to-read).

Read ``copying`` for what a head's weights do to a label's own embedding (the circuit as
Olsson's one-layer analysis defines it); read ``icl_copying`` for whether a head, as it runs in
context, writes the label it attends to — the question an induction head's copying answers.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from optolab.measures.measure import Measure, SplitData, head_rows
from optolab.model.transformer import LayerNorm

RESID_PRE = "blocks.{layer}.hook_resid_pre"
PATTERN = "blocks.{layer}.attn.hook_pattern"


CHUNK_ELEMENTS = 1 << 22  # logits per chunk: with 12,800 labels a whole split's would take ~0.8 GB


def head_logits(model, W_O: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ln_final(v[b, n, h] @ W_O[h]) @ W_U`` for every head: ``v [b, n, head, d_head]`` ->
    ``[b, n, head, d_out]``, without the ``[b, n, head, d_model]`` head outputs (8x the memory
    traffic; measured ~3x slower). The final LayerNorm of a head's output ``o = v W_O`` is
    ``(o − mean o) / sqrt(var o + eps) · w + b``, and both ``o − mean o = v C`` (``C``: ``W_O`` with
    each row's mean taken out) and ``var o = v (C Cᵀ / d) vᵀ`` are forms of ``v``; equal to the
    direct computation up to float rounding (tested)."""
    ln, W_U = model.ln_final, model.W_U
    if isinstance(ln, LayerNorm):
        C = W_O - W_O.mean(-1, keepdim=True)  # [head, d_head, d_model]
        var = (torch.einsum("bnhe,hef->bnhf", v, torch.einsum("hed,hfd->hef", C, C) / C.shape[-1]) * v).sum(-1)
        scaled = torch.einsum("bnhe,heo->bnho", v, torch.einsum("hed,do->heo", C, ln.w[:, None] * W_U))
        return scaled * torch.rsqrt(var + ln.eps)[..., None] + ln.b @ W_U
    if isinstance(ln, torch.nn.Identity):
        return torch.einsum("bnhe,heo->bnho", v, W_O @ W_U)
    return ln(torch.einsum("bnhe,hed->bnhd", v, W_O)) @ W_U  # another final norm: the direct way


def chance(n_labels: int) -> float:
    """The expected score of a head whose output at a label token ignores that token's label."""
    return 2.0 / n_labels - 1.0


def _ratio(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Olsson's ratio, mapped to ``2s − 1``, for the label each token carries ``[b, n_lab, head]``."""
    r = torch.relu(logits - logits.mean(-1, keepdim=True))
    own = r.gather(-1, labels[:, :, None, None].expand(-1, -1, logits.shape[2], 1)).squeeze(-1)
    return 2 * own / r.sum(-1).clamp_min(1e-12) - 1


@torch.no_grad()
def icl_copying_scores(model, normalized: list[torch.Tensor], patterns: list[torch.Tensor],
                       labels: torch.Tensor) -> torch.Tensor:
    """``[layer, head]`` scores (see the module docstring). ``normalized[l]``: layer ``l``'s
    attention input ``[batch, pos, d_model]``; ``patterns[l]``: its pattern ``[batch, head, q, k]``;
    ``labels``: the context's label ids ``[batch, n_labels_in_context]`` at positions 1, 3, …"""
    label_pos = torch.arange(1, 2 * labels.shape[1], 2, device=labels.device)
    H = model.cfg.n_heads
    scores = torch.empty(len(model.blocks), H, device=labels.device)
    n_lab, d_out = labels.shape[1], model.W_U.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // (n_lab * H * d_out))  # [chunk, n_lab, head, d_out] logits at a time
    for layer, block in enumerate(model.blocks):
        x = normalized[layer][:, label_pos]  # [batch, n_lab, d_model]
        v = torch.einsum("bnd,dhe->bnhe", x, block.attn.W_V)  # [batch, n_lab, head, d_head]
        s = torch.cat([_ratio(head_logits(model, block.attn.W_O, v[i:i + chunk]), labels[i:i + chunk])
                       for i in range(0, len(v), chunk)])
        # query -> label tokens [batch, n_lab, head]; a clamp may leave a pattern that is not a
        # distribution (noise, a scaled score): negative weights count as 0, so the score stays an
        # average in [-1, 1]
        w = patterns[layer][:, :, -1, label_pos].transpose(1, 2).clamp_min(0)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        scores[layer] = (s * w).sum(1).mean(0)
    return scores


class ICLCopying(Measure):
    NAME: ClassVar[str] = "icl_copying"
    METRICS: ClassVar[tuple[str, ...]] = ("icl_copying",)
    SITES: ClassVar[tuple[str, ...]] = (RESID_PRE, PATTERN)
    DOC: ClassVar[str] = "each head's copying of the label it attends to, on the residual it reads (exemplar-label tasks)"

    @torch.no_grad()
    def on_split(self, d: SplitData) -> list[dict]:
        b, model = d.batch, d.model
        if not d.main or b.match_mask is None or model is None or len(b.inputs) < 2:
            return []
        normalized = [block.ln1(d.saved[RESID_PRE.format(layer=layer)]) for layer, block in enumerate(model.blocks)]
        scores = icl_copying_scores(model, normalized, [d.saved[PATTERN.format(layer=layer)]
                                                        for layer in range(d.n_layers)], b.inputs[1])
        return [row for layer in range(d.n_layers) for row in head_rows(d.split, "icl_copying", scores[layer], layer)]
