"""``scale``: multiply the selected entries (e.g. an inverse temperature on attention scores)."""

from __future__ import annotations

from typing import ClassVar

import torch

from optolab.clamps.kind import Planned, SiteClamp


class Scale(SiteClamp):
    """Multiply the selected entries. On attention scores, masked (−inf) keys stay −inf."""

    KIND: ClassVar[str] = "scale"
    factor: float

    def fill(self, c: Planned):
        f = self.factor
        if c.site.is_scores:  # masked keys hold -inf; keep them (and avoid 0 * -inf)
            return lambda out, ctx: torch.where(torch.isfinite(out), out * f, out)
        return lambda out, ctx: out * f

    def describe(self, c: Planned, words) -> str:
        return f"{words.where(c)} is multiplied by {self.factor:g}."
