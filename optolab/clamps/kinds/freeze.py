"""``freeze``: a parameter (or some heads of it) gets no update while the window is open."""

from __future__ import annotations

import difflib
from typing import Annotated, ClassVar

import torch
from pydantic import BeforeValidator, Field, model_validator

from optolab.clamps.kind import ClampSpec, Heads, PlanContext, Planned, When, no_empty
from optolab.clamps.sources import load_param_values
from optolab.core.counts import Count
from optolab.core.errors import SpecError

HEAD_AXES = {"W_Q": 1, "W_K": 1, "W_V": 1, "W_O": 0, "b_Q": 0, "b_K": 0, "b_V": 0, "smear_alpha": 0}


def param_head_axis(name: str) -> int | None:
    return HEAD_AXES.get(name.rsplit(".", 1)[-1]) if ".attn." in name else None


def suggest_param(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "? ") if close else ""
    return hint + "Parameters are named like blocks.0.attn.W_V, W_X, W_L, W_U."


class Freeze(ClampSpec):
    """A parameter (or some heads of it) gets no update while the window is open; with
    ``source``, it is first set to that checkpoint's values. Around the optimizer step: its
    gradient slice is zeroed after ``backward`` and its values are restored after ``step`` (so
    Adam's momentum cannot move them)."""

    KIND: ClassVar[str] = "freeze"
    acts_on_forward: ClassVar[bool] = False
    unpackable: ClassVar[str | None] = "a freeze clamp rewrites parameters between steps"

    param: str = Field(description="a parameter name, e.g. blocks.0.attn.W_V")
    heads: Annotated[Heads, BeforeValidator(no_empty)] = "all"
    source: str | None = None
    step: Count | None = None

    @model_validator(mode="after")
    def _train_only(self) -> Freeze:
        if self.apply_at == "eval":
            raise SpecError("apply_at", "freeze acts on training updates only.",
                            "remove apply_at or set it to train or both.")
        return self

    def plan(self, i: int, ctx: PlanContext, when: When) -> Planned:
        params = dict(ctx.model.named_parameters())
        if self.param not in params:
            raise ctx.error(i, "param", f"unknown parameter '{self.param}'.", suggest_param(self.param, list(params)))
        heads = ctx.check_heads(i, self.heads)
        if heads is not None and param_head_axis(self.param) is None:
            raise ctx.error(i, "heads", f"'{self.param}' has no head axis.", "remove 'heads' to freeze it whole.")
        values = load_param_values(i, self, ctx.model) if self.source else None
        return Planned(i, self, when, heads=heads, data=values)

    def _index(self, c: Planned, p: torch.Tensor) -> tuple:
        if c.heads is None:
            return (slice(None),) * len(p.shape)
        return (slice(None),) * param_head_axis(self.param) + (list(c.heads),)

    @torch.no_grad()
    def apply_source(self, c: Planned, params: dict) -> None:
        if c.data is not None:
            p = params[self.param]
            index = self._index(c, p)
            p[index] = c.data[self.param][index].to(p.dtype)

    def after_backward(self, c: Planned, params: dict) -> list:
        p = params[self.param]
        index = self._index(c, p)
        if p.grad is not None:
            p.grad[index] = 0
        return [(p, index, p.detach()[index].clone())]

    def describe(self, c: Planned, words) -> str:
        heads = "" if c.heads is None else f" ({words.heads(c.heads)})"
        fixed = f", after being set to the values in {self.source}" if self.source else ""
        return f"parameter {self.param}{heads} gets no update{fixed} (restored after every optimizer step)."
