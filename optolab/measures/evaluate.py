"""One evaluation: every measure the protocol asks for, as tidy rows.

Rules:
- A row is ``{split, metric, layer, head, value}`` (plus ``src_layer``/``src_head`` for
  composition); the trainer adds ``step`` and ``sequences``. ``layer``/``head`` are None for
  whole-model metrics.
- Loss and accuracy are taken where the task's targets are not IGNORE. ``icl_acc`` (tasks with
  context labels) masks the logits of labels absent from the context before the argmax.
- Head scores are computed on every eval split the task declares, from the patterns the model
  actually used (after interventions, through the same ``Forward`` as training).
- Weight-based scores (copying, composition) use split ``"weights"``; the Olsson probe uses
  ``"probe_repeat"``.
- ``prefix_matching_lagged`` / ``prefix_matching_lag`` (task splits with induction targets):
  the best score over target keys shifted by 0..``max_lag`` and that lag (see
  :mod:`optolab.measures.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optolab.model.forward import Forward
from optolab.measures.attention import induction_strength, lagged_prefix_matching, prefix_matching, previous_token
from optolab.measures.composition import composition_scores
from optolab.measures.probes import copying_scores, icl_positions, repeat_probe
from optolab.model.transformer import Transformer
from optolab.tasks.base import IGNORE, Batch, Task


@dataclass
class EvalSet:
    """The fixed batches one run evaluates on, built once from the eval seed."""

    splits: dict[str, Batch]
    probe: Batch | None
    copy_ids: torch.Tensor | None

    @classmethod
    def build(cls, task: Task, spec, seed: int, n_ctx: int) -> EvalSet:
        splits = {s: task.eval_batch(s, seed, spec.eval_sequences) for s in task.eval_splits}
        probe = None
        vocab = task.token_probe_vocab()
        if vocab is not None and spec.prefix_matching:
            probe = repeat_probe(vocab[0], vocab[1], n_ctx, spec.probe_sequences, seed)
        copy_ids = None
        if spec.copying:
            labels = task.label_ids()
            copy_ids = labels if labels is not None else (
                torch.arange(min(vocab[0], 512)) if vocab is not None else None)
        return cls(splits, probe, copy_ids)


def _rows(split: str, metric: str, per_head: torch.Tensor, layer: int) -> list[dict]:
    return [{"split": split, "metric": metric, "layer": layer, "head": h, "value": float(v)}
            for h, v in enumerate(per_head.tolist())]


@torch.no_grad()
def evaluate(model: Transformer, task: Task, spec, evals: EvalSet, forward: Forward,
             step: int = 0) -> list[dict]:
    """Every measure at ``step`` (clamps active at that step act, as in training)."""
    was_training = model.training
    model.eval()
    L = model.cfg.n_layers
    sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
    rows: list[dict] = []
    try:
        for split, batch in evals.splits.items():
            logits, saved = forward(model, batch, step=step, training=False, save=sites)
            rows += _loss_rows(split, logits, batch)
            if spec.icl_score and batch.tokens is not None:
                rows += _icl_rows(split, logits, batch)
            for layer in range(L):
                pattern = saved[sites[layer]]
                if spec.induction_strength and batch.match_mask is not None:
                    rows += _rows(split, "induction_strength",
                                  induction_strength(pattern, batch.match_mask, batch.nonmatch_mask), layer)
                if spec.previous_token:
                    raw, corrected = previous_token(pattern)
                    rows += _rows(split, "prev_token", raw, layer)
                    rows += _rows(split, "prev_token_corrected", corrected, layer)
                if spec.prefix_matching and batch.induction_targets is not None:
                    rows += _rows(split, "prefix_matching", prefix_matching(pattern, batch.induction_targets), layer)
                    if spec.lagged_prefix_matching:
                        best, lag = lagged_prefix_matching(pattern, batch.induction_targets, spec.max_lag)
                        rows += _rows(split, "prefix_matching_lagged", best, layer)
                        rows += _rows(split, "prefix_matching_lag", lag, layer)
        if evals.probe is not None:
            _, saved = forward(model, evals.probe, step=step, training=False, save=sites)
            for layer in range(L):
                rows += _rows("probe_repeat", "prefix_matching",
                              prefix_matching(saved[sites[layer]], evals.probe.induction_targets), layer)
        if evals.copy_ids is not None:
            scores = copying_scores(model, evals.copy_ids)
            for layer in range(L):
                rows += _rows("weights", "copying", scores[layer], layer)
        if spec.composition and L > 1:
            rows += _composition_rows(model)
    finally:
        model.train(was_training)
    return rows


def _loss_rows(split: str, logits: torch.Tensor, batch: Batch) -> list[dict]:
    keep = batch.targets != IGNORE
    flat_logits, flat_targets = logits[keep], batch.targets[keep]
    loss = F.cross_entropy(flat_logits, flat_targets).item()
    acc = (flat_logits.argmax(-1) == flat_targets).float().mean().item()
    rows = [{"split": split, "metric": "loss", "layer": None, "head": None, "value": loss},
            {"split": split, "metric": "acc", "layer": None, "head": None, "value": acc}]
    if batch.context_labels is not None:
        # targets sit at the query (one per sequence); mask labels absent from the context
        masked = logits[:, -1].masked_fill(~batch.context_labels, float("-inf"))
        icl = (masked.argmax(-1) == batch.targets[:, -1]).float().mean().item()
        rows.append({"split": split, "metric": "icl_acc", "layer": None, "head": None, "value": icl})
    return rows


def icl_score_positions(batch: Batch) -> tuple[int, int] | None:
    keep = batch.targets != IGNORE
    return icl_positions([int(p) for p in torch.nonzero(keep.any(0)).flatten()])


def _icl_rows(split: str, logits: torch.Tensor, batch: Batch) -> list[dict]:
    chosen = icl_score_positions(batch)
    if chosen is None:
        return []
    early, late = chosen
    per_pos = F.cross_entropy(logits.transpose(1, 2), batch.targets.clamp_min(0), reduction="none")
    value = (per_pos[:, late].mean() - per_pos[:, early].mean()).item()
    return [{"split": split, "metric": "icl_score", "layer": None, "head": None, "value": value}]


def _composition_rows(model: Transformer) -> list[dict]:
    rows = []
    for metric, scores in composition_scores(model).items():
        L, H = scores.shape[:2]
        for src in range(L):
            for dst in range(src + 1, L):
                block = scores[src, :, dst, :]
                for sh in range(H):
                    for dh in range(H):
                        rows.append({"split": "weights", "metric": metric, "layer": dst, "head": dh,
                                     "src_layer": src, "src_head": sh, "value": float(block[sh, dh])})
    return rows
