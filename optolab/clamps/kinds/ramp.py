"""``ramp``: another site clamp at a strength that changes over the ramp's window.

The ramp holds one site clamp (``clamp:``, any kind that writes a value at one site with one op:
``ablate``, ``set``, ``scale``, ``add``, ``noise``, ``stop_gradient``, a plug-in ``SiteClamp``)
and writes ``lerp(out, value, s)``: the activation ``out`` moved towards the clamp's value by
the strength ``s`` (0: unclamped, 1: the clamp itself; on ``stop_gradient`` the forward is
unchanged and ``1 - s`` of the gradient passes). Where the activation or the value is infinite
(masked attention scores) the entry keeps the activation below strength 1 and takes the value at
1, so no entry is ever NaN.

``s`` goes from ``begin`` at the window's start to ``end`` at its stop: ``shape: linear`` along
the fraction elapsed ``f = (step - start) / (stop - start)``; ``shape: steps`` in ``levels``
(default 4) equal parts of the window, part ``j = floor(levels (step - start) / (stop - start))`` (integer
arithmetic) at ``begin + (end - begin) j / (levels - 1)``. An evaluation at step ``s`` sees the
strength of step ``s``; the final evaluation of a window that runs to the end sees ``end``, and
so does a post-hoc evaluation (``optolab evaluate``: windows are ignored there).
The step reaches the op as a tensor (:meth:`PassContext.clock
<optolab.clamps.values.PassContext.clock>`), so the compiled path builds one graph for every
step, and all four paths (nnsight, hooks, compiled, ensembles) give the same numbers.

The ramp's ``window`` and ``apply_at`` govern; the inner clamp must not give its own. Its
shape, ``begin``, ``end`` and ``levels`` are ordinary fields, so a sweep's ``dose`` design
varies them (``field: shape``, ``field: end``, or ``field: clamp.strength`` for the inner one's).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_serializer, field_validator, model_validator
from torch import Tensor

from optolab.clamps.kind import ClampSpec, Op, Parts, PlanContext, Planned, SiteClamp, When
from optolab.core.errors import OptolabError, SpecError


class Ramp(ClampSpec):
    """A site clamp whose strength follows a schedule over the ramp's window."""

    KIND: ClassVar[str] = "ramp"
    shareable: ClassVar[bool] = True  # the planner's probe keeps a ramped noise unshared
    site_rank: ClassVar[int] = 2

    clamp: ClampSpec = Field(description="the clamp whose strength ramps (a site clamp, no window)")
    shape: Literal["linear", "steps"] = Field("linear", description="linear, or levels equal steps")
    begin: float = Field(0.0, ge=0.0, le=1.0, description="the strength at the window's start")
    end: float = Field(1.0, ge=0.0, le=1.0, description="the strength at the window's stop")
    levels: int | None = Field(None, ge=2, description="shape: steps: how many strengths, begin to end (default 4)")

    @field_validator("clamp", mode="before")
    @classmethod
    def _inner(cls, v: Any) -> ClampSpec:
        from optolab.clamps.registry import validate_clamp  # the registry imports every kind

        if isinstance(v, dict):
            for key in ("window", "apply_at"):
                if key in v:
                    raise SpecError(key, f"the ramp's {key} governs; the ramped clamp gives its own.",
                                    f"move {key} to the ramp itself.")
        try:
            spec = validate_clamp(v, "clamp")
        except OptolabError as e:
            raise SpecError((e.field or "clamp").removeprefix("clamp").lstrip("."), e.message, e.fix or "") from None
        if not (isinstance(spec, SiteClamp) and spec.writes_values and spec.acts_on_forward
                and type(spec).contribute is SiteClamp.contribute and type(spec).prepare is ClampSpec.prepare
                and not spec.needs and spec.unpackable is None):
            raise SpecError("kind", f"a '{spec.kind}' clamp cannot ramp: a ramp scales a clamp that writes a "
                            "value at one site in one op.", "ramp ablate, set, scale, add, noise or stop_gradient.")
        return spec

    @field_serializer("clamp")
    def _dump_inner(self, v: ClampSpec, info) -> dict:  # its own kind's fields; the ramp's window governs
        return v.model_dump(mode=info.mode, exclude={"window", "apply_at"})

    @model_validator(mode="after")
    def _levels_only_for_steps(self) -> Ramp:
        if self.shape == "linear" and self.levels is not None:
            raise SpecError("levels", "levels applies to shape: steps only.", "remove levels, or use shape: steps.")
        return self

    # --- planning --------------------------------------------------------------------------

    def plan(self, i: int, ctx: PlanContext, when: When) -> Planned:
        try:
            inner = self.clamp.plan(i, ctx, when)
        except OptolabError as e:  # name the inner clamp's field: clamps.<i>.clamp.<field>
            field = e.field.replace(f"clamps.{i}.", f"clamps.{i}.clamp.", 1) if e.field else f"clamps.{i}.clamp"
            raise OptolabError(e.message, field=field, fix=e.fix) from None
        return Planned(i, self, when, inner.site, inner.heads, inner.positions, data=inner)

    def writes(self, c: Planned):
        return self.clamp.writes(c.data)

    def pack_constraint(self) -> object:
        return self.clamp.pack_constraint()

    # --- the forward -----------------------------------------------------------------------

    def steps(self) -> int:
        return 4 if self.levels is None else self.levels

    def strength(self, c: Planned):
        """``fn(ctx) -> s``: the strength at the call's step (a float32 scalar tensor)."""
        begin, end, levels, shape = self.begin, self.end, self.steps(), self.shape

        def s(ctx) -> Tensor:
            clock = ctx.clock(c)
            if shape == "linear":
                f = clock.fraction
            else:
                part = ((clock.step - clock.start) * levels).div(clock.stop - clock.start, rounding_mode="floor")
                f = part.clamp(0, levels - 1).to(torch.float32) / (levels - 1)
            return begin + (end - begin) * f

        return s

    def op(self, c: Planned, exemplar_label: bool) -> Op:
        inner = c.data
        value, strength = inner.spec.fill(inner), self.strength(c)

        def ramped(out: Tensor, ctx) -> Tensor:
            v = torch.as_tensor(value(out, ctx), dtype=out.dtype, device=out.device)
            s = strength(ctx).to(out.dtype)
            finite = torch.isfinite(out) & torch.isfinite(v)
            return torch.where(finite, torch.lerp(out, v.expand_as(out), s), torch.where(s >= 1, v, out))

        return inner.spec.op(inner, exemplar_label, ramped)

    def contribute(self, c: Planned, parts: Parts) -> None:
        op = self.op(c, parts.exemplar_label)
        for p in parts.forward_passes:
            parts.add(p, c.site.name, self.site_rank, op)

    def describe(self, c: Planned, words) -> str:
        inner = self.clamp.describe(c.data, words).rstrip(".")
        how = "linearly" if self.shape == "linear" else f"in {self.steps()} equal steps"
        return (f"{inner}, at a strength that goes {how} from {self.begin:g} to {self.end:g} over the window "
                "(0: unclamped, 1: the clamp's full value).")
