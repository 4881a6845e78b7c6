"""``ablate``: replace the selected entries with zero, the batch mean, or another sequence's."""

from __future__ import annotations

from typing import ClassVar, Literal

from optolab.clamps.kind import Planned, SiteClamp


class Ablate(SiteClamp):
    """Replace the selected entries: ``zero``; ``mean`` over the batch being run (per position,
    detached); ``resample`` from the next sequence in the batch (detached)."""

    KIND: ClassVar[str] = "ablate"
    how: Literal["zero", "mean", "resample"] = "zero"

    def fill(self, c: Planned):
        if self.how == "zero":
            return lambda out, ctx: out.new_zeros(())
        if self.how == "mean":
            return lambda out, ctx: out.detach().mean(0, keepdim=True)
        return lambda out, ctx: out.detach().roll(1, dims=0)

    def describe(self, c: Planned, words) -> str:
        where = words.where(c)
        return {"zero": f"{where} is set to zero (ablated).",
                "mean": f"{where} is replaced by its mean over the batch, per position (no gradient through it).",
                "resample": f"{where} is taken from another sequence of the same batch (no gradient through it)."
                }[self.how]
