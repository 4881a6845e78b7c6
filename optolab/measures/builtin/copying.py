"""``copying`` (Olsson et al. 2022): how much a head's direct path raises the logit of the token
(or label) it attends to, from the weights (split ``weights``; see :mod:`optolab.measures.probes`)."""

from __future__ import annotations

from typing import ClassVar

import torch

from optolab.measures.measure import Measure, ModelData, head_rows
from optolab.measures.probes import copying_scores


class Copying(Measure):
    NAME: ClassVar[str] = "copying"
    METRICS: ClassVar[tuple[str, ...]] = ("copying",)
    DOC: ClassVar[str] = "each head's direct-path copying score, from the weights"

    def build(self, task, spec, seed: int, n_ctx: int):
        labels = task.label_ids()
        if labels is not None:
            return labels
        vocab = task.token_probe_vocab()
        return torch.arange(min(vocab[0], 512)) if vocab is not None else None

    def on_model(self, d: ModelData) -> list[dict]:
        if d.data is None:
            return []
        scores = copying_scores(d.model, d.data)
        return [row for layer in range(d.model.cfg.n_layers) for row in head_rows("weights", "copying", scores[layer], layer)]
