"""``add``: add a constant to the selected entries."""

from __future__ import annotations

from typing import ClassVar

from optolab.clamps.kind import Planned, SiteClamp


class Add(SiteClamp):
    KIND: ClassVar[str] = "add"
    value: float

    def fill(self, c: Planned):
        v = self.value
        return lambda out, ctx: out + v

    def describe(self, c: Planned, words) -> str:
        return f"{self.value:g} is added to {words.where(c)}."
