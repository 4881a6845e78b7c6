"""``preserve``: record a site in a clean pass, then force it while the other clamps act."""

from __future__ import annotations

from typing import ClassVar

from optolab.clamps.kind import Parts, Planned, SiteClamp, record


class Preserve(SiteClamp):
    """Two passes: record ``site`` from an unclamped pass, then force it while the other clamps
    act. Where another clamp writes the same entries, the other clamp wins (it acts later at the
    site: rank 1 against 2)."""

    KIND: ClassVar[str] = "preserve"
    needs: ClassVar[frozenset[str]] = frozenset({"clean"})
    writes_values: ClassVar[bool] = False  # the weakest clamp: it may overlap any other
    shareable: ClassVar[bool] = False

    def fill(self, c: Planned):
        key = ("clean", c.site.name)
        return lambda out, ctx: ctx.recorded[key]

    def contribute(self, c: Planned, parts: Parts) -> None:
        site = c.site.name
        parts.add("clean", site, 4, record(("clean", site)))
        parts.add("main", site, 1, self.op(c, parts.exemplar_label))

    def describe(self, c: Planned, words) -> str:
        return (f"{words.where(c)} is recorded in a clean pass (no clamps) and forced in the clamped pass; other "
                "clamps on the same entries win (pattern- or value-preserving ablations).")
