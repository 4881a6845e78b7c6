"""``icl_score`` (Olsson et al. 2022): loss at a late minus loss at an early target position, at
Olsson's 500 and 50 of 512 scaled to the positions that carry a loss (token tasks)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from optolab.measures.measure import Measure, SplitData, model_row
from optolab.measures.probes import icl_positions
from optolab.tasks.base import IGNORE


def icl_score_positions(batch) -> tuple[int, int] | None:
    keep = batch.targets != IGNORE
    return icl_positions([int(p) for p in torch.nonzero(keep.any(0)).flatten()])


class ICLScore(Measure):
    NAME: ClassVar[str] = "icl_score"
    METRICS: ClassVar[tuple[str, ...]] = ("icl_score",)
    DOC: ClassVar[str] = "Olsson's in-context learning score (token tasks)"

    def on_split(self, d: SplitData) -> list[dict]:
        batch = d.batch
        if batch.tokens is None:
            return []
        chosen = icl_score_positions(batch)
        if chosen is None:
            return []
        early, late = chosen
        per_pos = F.cross_entropy(d.logits.transpose(1, 2), batch.targets.clamp_min(0), reduction="none")
        return [model_row(d.split, "icl_score", (per_pos[:, late].mean() - per_pos[:, early].mean()).item())]

    def summary(self, task, seed: int) -> dict:
        # the positions the score compares, so a reader knows which "late − early" it is
        probe = task.eval_batch(task.main_split, seed, 1)
        return {"icl_positions": icl_score_positions(probe)} if probe.tokens is not None else {}
