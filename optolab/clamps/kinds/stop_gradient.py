"""``stop_gradient``: the forward is unchanged; no gradient flows back through the selection."""

from __future__ import annotations

from typing import ClassVar

from optolab.clamps.kind import Planned, SiteClamp


class StopGradient(SiteClamp):
    """Forward unchanged; no gradient flows back through the selected entries."""

    KIND: ClassVar[str] = "stop_gradient"

    def fill(self, c: Planned):
        return lambda out, ctx: out.detach()

    def describe(self, c: Planned, words) -> str:
        return f"{words.where(c)} is unchanged in the forward pass, but no gradient flows back through it."
