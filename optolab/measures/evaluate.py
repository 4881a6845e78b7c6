"""One evaluation: the loss and accuracy, and every measure the protocol switches on, as tidy rows.

Rules:
- A row is ``{split, metric, layer, head, value}`` (plus ``src_layer``/``src_head`` between two
  heads); the trainer adds ``step`` and ``sequences``. ``layer``/``head`` are None for
  whole-model metrics.
- Loss and accuracy (always measured) are taken where the task's targets are not IGNORE.
  ``icl_acc`` (tasks with context labels) masks the logits of labels absent from the context
  before the argmax.
- Each eval split goes through the run's ``Forward`` once (clamps active at the step act, as in
  training), saving every site the switched-on measures read; each measure then makes its rows
  (:mod:`optolab.measures.measure`), split by split, then from the model. The evaluator names
  no measure: they come from :mod:`optolab.measures.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from optolab.core.device import to_device
from optolab.core.errors import OptolabError
from optolab.measures.measure import ModelData, SplitData, model_row
from optolab.measures.registry import active
from optolab.model.forward import Forward
from optolab.model.transformer import Transformer
from optolab.tasks.base import IGNORE, Batch, Task


@dataclass
class EvalSet:
    """The fixed batches one run evaluates on, built once from the eval seed, and each
    switched-on measure's own fixed data (``extra[name]``)."""

    splits: dict[str, Batch]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, task: Task, spec, seed: int, n_ctx: int, device: torch.device | None = None) -> EvalSet:
        """Made on the CPU (the same numbers everywhere), then moved to ``device``."""
        splits = {s: task.eval_batch(s, seed, spec.eval_sequences) for s in eval_splits(spec, task)}
        evals = cls(splits, {m.NAME: m.build(task, spec, seed, n_ctx) for m in active(spec)})
        return evals if device is None or device.type == "cpu" else evals.to_device(device)

    def to_device(self, device: torch.device) -> EvalSet:
        return EvalSet(to_device(self.splits, device), to_device(self.extra, device))


def eval_splits(spec, task: Task) -> list[str]:
    """The splits ``spec`` (a protocol's ``measures:``) evaluates, in the task's order:
    ``measures.splits`` or every split. Each split's batch is drawn from the eval seed alone, so
    leaving splits out changes no other split's numbers (and never training)."""
    if spec.splits is None:
        return list(task.eval_splits)
    unknown = [s for s in spec.splits if s not in task.eval_splits]
    if unknown:
        raise OptolabError(f"measures.splits names '{unknown[0]}', which the task ({task.kind}) has no split of.",
                           field="measures.splits", fix=f"choose from {', '.join(task.eval_splits)}.")
    if task.main_split not in spec.splits:
        raise OptolabError(f"measures.splits leaves out the main split '{task.main_split}' (summaries, stop "
                           "rules and reports read it).", field="measures.splits",
                           fix=f"add '{task.main_split}' to the list.")
    return [s for s in task.eval_splits if s in spec.splits]


@torch.no_grad()
def evaluate(model: Transformer, task: Task, spec, evals: EvalSet, forward: Forward, step: int = 0,
             per_example: dict | None = None) -> list[dict]:
    """Every measure at ``step`` (clamps active at that step act, as in training). With
    ``per_example`` (a dict), each split's per-position losses go there too (:func:`position_losses`)."""
    was_training = model.training
    model.eval()
    L = model.cfg.n_layers
    measures = active(spec)
    sites = list(dict.fromkeys(s.format(layer=layer) for m in measures for s in m.SITES for layer in range(L)))
    rows: list[dict] = []
    try:
        for split, batch in evals.splits.items():
            logits, saved = forward(model, batch, step=step, training=False, save=sites)
            rows += _loss_rows(split, logits, batch)
            if per_example is not None:
                per_example[split] = position_losses(logits, batch, spec.per_example_max)
            data = SplitData(split, batch, logits, saved, L, spec, model, split == task.main_split)
            for m in measures:
                rows += m.on_split(data)
        for m in measures:
            rows += m.on_model(ModelData(model, forward, step, evals.extra.get(m.NAME), sites, spec))
    finally:
        model.train(was_training)
    return rows


def position_losses(logits: torch.Tensor, batch: Batch, limit: int) -> torch.Tensor:
    """The loss at each scored position (targets not IGNORE), sequence by sequence, position by
    position, the first ``limit`` of them, as float32 on the CPU: the same positions at every eval
    of a run (the eval set is fixed)."""
    keep = batch.targets != IGNORE
    losses = F.cross_entropy(logits[keep].float(), batch.targets[keep], reduction="none")
    return losses[:limit].cpu()


def _loss_rows(split: str, logits: torch.Tensor, batch: Batch) -> list[dict]:
    keep = batch.targets != IGNORE
    flat_logits, flat_targets = logits[keep], batch.targets[keep]
    loss = F.cross_entropy(flat_logits, flat_targets).item()
    acc = (flat_logits.argmax(-1) == flat_targets).float().mean().item()
    rows = [model_row(split, "loss", loss), model_row(split, "acc", acc)]
    if batch.context_labels is not None:
        # targets sit at the query (one per sequence); mask labels absent from the context
        masked = logits[:, -1].masked_fill(~batch.context_labels, float("-inf"))
        rows.append(model_row(split, "icl_acc", (masked.argmax(-1) == batch.targets[:, -1]).float().mean().item()))
    return rows
