"""``path_ablate``: ablate an activation on one path only — "preserve everything but the keys".

Two passes. In the ``ablated`` pass the ``without`` entries (for example layer 0's attention
output, or some of its heads' results with ``without_heads``) are ablated as
:mod:`~optolab.clamps.kinds.ablate` does, and ``site`` is recorded downstream of them; in the main
pass ``site`` takes that recorded value, while everything else, the ablated activation's other
paths included, runs as it would. With ``site: k1`` and ``without: attn_out0`` only layer 1's keys
lose layer 0's output (K-composition ablated); ``q1`` and ``v1`` do the same for Q- and
V-composition (the two-pass ablations of Singh et al. 2025). Other clamps act in both passes.
``site`` must come after ``without`` in the forward order.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator

from optolab.clamps.kind import Heads, Parts, PlanContext, Planned, SiteClamp, no_empty, record
from optolab.clamps.kinds.ablate import Ablate
from optolab.clamps.sites import SiteInfo, canonical, site_info, suggest


class PathAblate(SiteClamp):
    """``site`` is recomputed in a pass where ``without`` (``without_heads`` of it) is ablated, and
    forced in the main pass: only the path through ``site`` loses it."""

    KIND: ClassVar[str] = "path_ablate"
    needs: ClassVar[dict[str, int]] = {"ablated": 20}  # after a layer clamp's shifted pass, before main
    shareable: ClassVar[bool] = False

    without: str
    without_heads: Annotated[Heads, BeforeValidator(no_empty)] = "all"
    how: Literal["zero", "mean", "resample"] = "zero"

    def check(self, i: int, ctx: PlanContext, info: SiteInfo) -> None:
        name = canonical(self.without)
        order = list(ctx.shapes)
        if name not in ctx.shapes:
            raise ctx.error(i, "without", f"unknown hook site '{self.without}'.", suggest(self.without, order))
        if order.index(name) >= order.index(info.name):
            raise ctx.error(i, "without", f"'{name}' does not come before '{info.name}' in the forward pass, so "
                            "ablating it cannot change the site.", "name an activation upstream of the site.")
        heads = ctx.check_heads(i, self.without_heads, "without_heads")
        if heads is not None and site_info(name).head_axis is None:
            raise ctx.error(i, "without_heads", f"'{name}' has no head axis.",
                            "remove 'without_heads', or use a per-head site such as result0 or z0.")

    def _source(self, c: Planned) -> Planned:
        spec = Ablate(kind="ablate", site=self.without, heads=self.without_heads, how=self.how)
        info = site_info(canonical(self.without))
        heads = None if self.without_heads == "all" else tuple(sorted(set(self.without_heads)))
        return Planned(c.index, spec, c.when, info, heads, "all")

    def fill(self, c: Planned):
        key = ("ablated", c.site.name)
        return lambda out, ctx: ctx.recorded[key]

    def contribute(self, c: Planned, parts: Parts) -> None:
        site, source = c.site.name, self._source(c)
        parts.add("ablated", source.site.name, 2, source.spec.op(source, parts.exemplar_label))
        parts.add("ablated", site, 4, record(("ablated", site)))
        parts.add("main", site, 2, self.op(c, parts.exemplar_label))

    def describe(self, c: Planned, words) -> str:
        src = canonical(self.without)
        heads = "" if self.without_heads == "all" else f" (heads {', '.join(map(str, self.without_heads))})"
        return (f"{words.where(c)} is recomputed in a second pass where {src}{heads} is ablated ({self.how}) and "
                "forced in the main pass: only this path loses it; every other path sees it.")
