"""``composition`` (Elhage et al. 2021): Q-, K- and V-composition between every pair of heads in
layers l < l', from the weights (split ``weights``, metrics ``comp_q``/``comp_k``/``comp_v``)."""

from __future__ import annotations

from typing import ClassVar

from optolab.measures.composition import composition_scores
from optolab.measures.measure import Measure, ModelData


class Composition(Measure):
    NAME: ClassVar[str] = "composition"
    METRICS: ClassVar[tuple[str, ...]] = ("comp_q", "comp_k", "comp_v")
    DOC: ClassVar[str] = "Q/K/V composition between heads of different layers, from the weights"

    def on_model(self, d: ModelData) -> list[dict]:
        if d.model.cfg.n_layers < 2:
            return []
        rows = []
        for metric, scores in composition_scores(d.model).items():
            L, H = scores.shape[:2]
            for src in range(L):
                for dst in range(src + 1, L):
                    block = scores[src, :, dst, :]
                    for sh in range(H):
                        for dh in range(H):
                            rows.append({"split": "weights", "metric": metric, "layer": dst, "head": dh,
                                         "src_layer": src, "src_head": sh, "value": float(block[sh, dh])})
        return rows
