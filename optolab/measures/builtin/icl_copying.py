"""``icl_copying``: the in-context copying score — Olsson et al.'s copying ratio computed on the
residual the head actually reads at the label tokens it attends to (exemplar–label tasks).

Olsson's direct-path score (``copying``, :mod:`optolab.measures.probes`) pushes a label's bare
*embedding* through a head's OV circuit. In the Singh task a label's identity reaches layer 2
through layer 1's outputs, not through the bare embedding, so the strongest induction heads
score ≤ 0 there (a head with induction strength 0.92 scored −0.55). This score asks the same
question of the input the head really has:

- For each sequence of a fixed batch of the main split (``icl_copying_sequences``, built from the
  eval seed) and each head, take the head's layer input (``ln1``'s output) at every label token
  of the context, apply the head's OV circuit (``W_V`` then ``W_O``), the final LayerNorm and the
  unembedding: logits over labels, one vector per label token.
- Olsson's ratio on each: ``s = relu(l_own − mean l) / Σ relu(l − mean l)`` for the label that
  token carries, mapped to ``2s − 1`` (1: the head copies that label, −1: it suppresses it).
- Average over the label tokens weighted by the head's attention from the query to them (as the
  head reads them), then over sequences. Rows: split ``in_context``, one per head of every layer.

Read ``copying`` for what a head's weights do to a label's own embedding (the circuit as
Olsson's one-layer analysis defines it); read ``icl_copying`` for whether a head, as it runs in
context, writes the label it attends to — the question an induction head's copying answers.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from optolab.core.counts import PosCount
from optolab.measures.measure import Measure, ModelData, head_rows

NORMALIZED = "blocks.{layer}.ln1.hook_normalized"  # the attention's input (without block LayerNorms: resid_pre)
RESID_PRE = "blocks.{layer}.hook_resid_pre"
PATTERN = "blocks.{layer}.attn.hook_pattern"


@torch.no_grad()
def icl_copying_scores(model, normalized: list[torch.Tensor], patterns: list[torch.Tensor],
                       labels: torch.Tensor) -> torch.Tensor:
    """``[layer, head]`` scores (see the module docstring). ``normalized[l]``: layer ``l``'s
    attention input ``[batch, pos, d_model]``; ``patterns[l]``: its pattern ``[batch, head, q, k]``;
    ``labels``: the context's label ids ``[batch, n_labels_in_context]`` at positions 1, 3, …"""
    label_pos = torch.arange(1, 2 * labels.shape[1], 2, device=labels.device)
    H = model.cfg.n_heads
    scores = torch.empty(len(model.blocks), H, device=labels.device)
    for layer, block in enumerate(model.blocks):
        x = normalized[layer][:, label_pos]  # [batch, n_lab, d_model]
        v = torch.einsum("bnd,dhe->bnhe", x, block.attn.W_V)
        out = torch.einsum("bnhe,hed->bnhd", v, block.attn.W_O)  # [batch, n_lab, head, d_model]
        logits = model.ln_final(out) @ model.W_U  # [batch, n_lab, head, d_out]
        r = torch.relu(logits - logits.mean(-1, keepdim=True))
        own = r.gather(-1, labels[:, :, None, None].expand(-1, -1, H, 1)).squeeze(-1)
        s = 2 * own / r.sum(-1).clamp_min(1e-12) - 1  # [batch, n_lab, head]
        w = patterns[layer][:, :, -1, label_pos].transpose(1, 2)  # [batch, n_lab, head]: query -> label tokens
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        scores[layer] = (s * w).sum(1).mean(0)
    return scores


class ICLCopying(Measure):
    NAME: ClassVar[str] = "icl_copying"
    DOC: ClassVar[str] = "each head's copying of the label it attends to, on the residual it reads (exemplar-label tasks)"
    OPTIONS: ClassVar[dict] = {
        "icl_copying_sequences": (PosCount, Field(200, description="sequences of the main split for icl_copying")),
    }

    def build(self, task, spec, seed: int, n_ctx: int):
        if task.model_io().input_mode != "exemplar_label":
            return None
        return task.eval_batch(task.main_split, seed, spec.icl_copying_sequences)

    def on_model(self, d: ModelData) -> list[dict]:
        batch = d.data
        if batch is None:
            return []
        L = d.model.cfg.n_layers
        inputs = [(NORMALIZED if d.model.cfg.layer_norm else RESID_PRE).format(layer=layer) for layer in range(L)]
        patterns = [PATTERN.format(layer=layer) for layer in range(L)]
        sites = [s for pair in zip(inputs, patterns) for s in pair]  # in forward order
        _, saved = d.forward(d.model, batch, step=d.step, training=False, save=sites)
        scores = icl_copying_scores(d.model, [saved[s] for s in inputs], [saved[s] for s in patterns],
                                    batch.inputs[1])
        return [row for layer in range(L) for row in head_rows("in_context", "icl_copying", scores[layer], layer)]
