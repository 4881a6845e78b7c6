"""``previous_token``: attention from each position to the one before, per head, raw and
baseline-corrected (0 for uniform attention, 1 for a perfect previous-token head)."""

from __future__ import annotations

from typing import ClassVar

from optolab.measures.attention import previous_token
from optolab.measures.measure import Curve, Measure, SplitData, head_rows

PATTERN = "blocks.{layer}.attn.hook_pattern"


class PreviousToken(Measure):
    NAME: ClassVar[str] = "previous_token"
    METRICS: ClassVar[tuple[str, ...]] = ("prev_token", "prev_token_corrected")
    CURVES: ClassVar[tuple[Curve, ...]] = (
        Curve("prev_token", "previous_token", layer="first", title="Previous-token score"),)
    SITES: ClassVar[tuple[str, ...]] = (PATTERN,)
    DOC: ClassVar[str] = "attention to the previous position (raw and baseline-corrected)"

    def on_split(self, d: SplitData) -> list[dict]:
        rows = []
        for layer in range(d.n_layers):
            raw, corrected = previous_token(d.saved[PATTERN.format(layer=layer)])
            rows += head_rows(d.split, "prev_token", raw, layer)
            rows += head_rows(d.split, "prev_token_corrected", corrected, layer)
        return rows
