"""``graft``: a site takes its value from a frozen model (another run's checkpoint) on the same batch."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field
from torch import Tensor

from optolab.clamps.kind import PlanContext, Planned, SiteClamp
from optolab.clamps.sources import load_frozen_model
from optolab.core.counts import Count
from optolab.model.forward import PlainForward


class Graft(SiteClamp):
    """``site`` takes its value from a frozen model: another run's checkpoint, run on the same
    batch without clamps (before the passes: :meth:`prepare`)."""

    KIND: ClassVar[str] = "graft"
    unpackable: ClassVar[str | None] = "a graft clamp runs a second model"
    shareable: ClassVar[bool] = False

    source: str = Field(description="a run directory or a checkpoint .safetensors file")
    step: Count | None = Field(None, description="checkpoint step in a run directory (default: the last)")

    def load(self, i: int, ctx: PlanContext, c: Planned) -> Any:
        return load_frozen_model(i, self, ctx.cfg, ctx.batch, ctx.shapes)

    def prepare(self, c: Planned, batch) -> Tensor:
        """The frozen model's activation, on the batch's device (the frozen model stays where
        the plan put it: :meth:`~optolab.clamps.plan.Plan.to_device`)."""
        device = next(c.data.parameters()).device
        _, got = PlainForward()(c.data, batch.to_device(device), save=[c.site.name])
        return got[c.site.name].to(batch.targets.device)

    def fill(self, c: Planned):
        index = c.index
        return lambda out, ctx: ctx.prepared[index]

    def describe(self, c: Planned, words) -> str:
        step = f" step {self.step}" if self.step is not None else " (last checkpoint)"
        return f"{words.where(c)} is replaced by the frozen model's, from {self.source}{step}."
