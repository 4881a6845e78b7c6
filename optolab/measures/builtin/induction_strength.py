"""``induction_strength`` (Singh et al. 2024): at the query, attention on the label tokens that
carry the query's label minus attention on the other label tokens, per head (tasks with labels)."""

from __future__ import annotations

from typing import ClassVar

from optolab.measures.attention import induction_strength
from optolab.measures.measure import Curve, Measure, SplitData, head_rows

PATTERN = "blocks.{layer}.attn.hook_pattern"


class InductionStrength(Measure):
    NAME: ClassVar[str] = "induction_strength"
    METRICS: ClassVar[tuple[str, ...]] = ("induction_strength",)
    CURVES: ClassVar[tuple[Curve, ...]] = (
        Curve("induction_strength", "induction", title="Induction strength (query → correct − wrong label)"),)
    SITES: ClassVar[tuple[str, ...]] = (PATTERN,)
    DOC: ClassVar[str] = "attention on the matching label minus the others, at the query (labelled tasks)"

    def on_split(self, d: SplitData) -> list[dict]:
        b = d.batch
        if b.match_mask is None:
            return []
        return [row for layer in range(d.n_layers)
                for row in head_rows(d.split, "induction_strength",
                                     induction_strength(d.saved[PATTERN.format(layer=layer)], b.match_mask,
                                                        b.nonmatch_mask), layer)]
