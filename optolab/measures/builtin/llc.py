"""``llc``: the local learning coefficient at checkpoints, whole model and chosen heads
(:mod:`optolab.measures.llc` states the method). Off by default: it costs SGLD chains per
checkpoint and needs the ``[llc]`` extra (devinterp)."""

from __future__ import annotations

from typing import ClassVar

from optolab.measures import llc
from optolab.measures.measure import CheckpointData, Curve, Measure


class LLC(Measure):
    NAME: ClassVar[str] = "llc"
    METRICS: ClassVar[tuple[str, ...]] = ("llc", "llc_head")
    # stages read only estimates whose chains are healthy (a chain that left the basin, or a
    # negative LLC, is no reading of the checkpoint: docs/measures.md#llc)
    CURVES: ClassVar[tuple[Curve, ...]] = (Curve("llc", "stage", layer=None, split="llc", title="LLC",
                                                 valid="llc_ok"),)
    DEFAULT: ClassVar[bool] = False
    CONFIG: ClassVar[type] = llc.LLCSpec
    DOC: ClassVar[str] = "local learning coefficient by SGLD (devinterp; docs/measures.md#llc)"

    def check(self, config: llc.LLCSpec, cfg) -> None:
        llc.require()
        llc.check_heads(config.heads, cfg.n_layers, cfg.n_heads)

    def on_checkpoint(self, d: CheckpointData) -> list[dict]:
        spec: llc.LLCSpec = d.config
        forward = d.make_forward() if spec.clamps else d.plain_forward()
        try:
            found = llc.estimates(d.model, d.data, forward, spec, step=llc.clamp_step(d.step, d.total_steps),
                                  batch_size=d.batch_size)
        finally:
            forward.close()
        llc.save(d.folder, d.step, d.sequences, found, source="run")
        return llc.rows(found)

    def forget_after(self, folder, step: int) -> None:
        llc.truncate(folder, step)
