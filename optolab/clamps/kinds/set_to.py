"""``set``: force the selected entries to a built-in attention pattern, a constant or a tensor file."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import Tensor

from optolab.clamps.kind import PlanContext, Planned, SiteClamp
from optolab.clamps.sources import load_tensor_file
from optolab.clamps.values import perfect_match_rows, previous_token_pattern, uniform_pattern
from optolab.core.errors import SpecError


@lru_cache(maxsize=64)
def _fixed_pattern(to: str, n_q: int, n_k: int, strength: float) -> Tensor:
    return previous_token_pattern(n_q, n_k, strength) if to == "previous_token" else uniform_pattern(n_q, n_k)


class SetTo(SiteClamp):
    """Force the selected entries to a built-in pattern, a constant or a tensor file."""

    KIND: ClassVar[str] = "set"
    to: Literal["previous_token", "perfect_match", "uniform", "constant", "file"]
    strength: float = Field(1.0, ge=0, le=1, description="previous_token / perfect_match weight s")
    value: float | None = Field(None, description="for to: constant")
    file: str | None = Field(None, description="for to: file — a .safetensors file with one tensor")

    @model_validator(mode="after")
    def _args(self) -> SetTo:
        if self.to == "constant" and self.value is None:
            raise SpecError("value", "to: constant needs 'value'.", "add e.g. value: 0.0")
        if self.to != "constant" and self.value is not None:
            raise SpecError("value", f"'value' is only used with to: constant (this clamp sets to: {self.to}).",
                            "remove value, or set to: constant.")
        if self.to == "file" and not self.file:
            raise SpecError("file", "to: file needs 'file'.", "add file: a .safetensors path relative to the protocol.")
        if self.to != "file" and self.file:
            raise SpecError("file", f"'file' is only used with to: file (this clamp sets to: {self.to}).",
                            "remove file, or set to: file.")
        if self.to in ("constant", "file", "uniform") and self.strength != 1.0:
            raise SpecError("strength", f"'strength' is only used with previous_token and perfect_match, not {self.to}.",
                            "remove strength.")
        return self

    def selected_positions(self):
        # perfect_match writes the query row only ("all" is the default: the query row)
        return "query" if self.to == "perfect_match" else super().selected_positions()

    def check(self, i: int, ctx: PlanContext, info) -> None:
        name = info.name
        if self.to in ("previous_token", "perfect_match", "uniform") and not info.is_pattern:
            raise ctx.error(i, "site", f"to: {self.to} is an attention pattern, but '{name}' is not one.",
                            f"use site blocks.<layer>.attn.hook_pattern (e.g. pattern{info.layer or 0}).")
        if self.to == "perfect_match":
            if ctx.batch.match_mask is None:
                raise ctx.error(i, "to", f"perfect_match needs the query's label among the context labels, but this "
                                f"task ({ctx.task.kind}) has no labels.",
                                "use a fewshot task, or set to: previous_token/uniform.")
            if self.positions not in ("all", "query"):
                raise ctx.error(i, "positions", "perfect_match sets the query row only.",
                                "remove 'positions' or use query.")

    def load(self, i: int, ctx: PlanContext, c: Planned) -> Any:
        if self.to == "file":
            return load_tensor_file(i, self.file, ctx.shapes[c.site.name])
        return None

    def fill(self, c: Planned):
        to, strength = self.to, self.strength
        if to in ("previous_token", "uniform"):
            patterns: dict[tuple, Tensor] = {}  # per shape and device; a plain dict the compiler can read

            def fixed(out: Tensor, ctx) -> Tensor:
                key = (out.shape, out.device)
                p = patterns.get(key)
                if p is None:
                    p = patterns[key] = _fixed_pattern(to, out.shape[-2], out.shape[-1], strength).to(out.device)
                return p
            return fixed
        if to == "perfect_match":
            return lambda out, ctx: perfect_match_rows(ctx.batch, strength)
        if to == "constant":
            value = self.value
            return lambda out, ctx: out.new_full((), value)
        tensor = c.data
        return lambda out, ctx: tensor

    def describe(self, c: Planned, words) -> str:
        who = words.pattern_subject(c)
        one = c.heads is not None and len(c.heads) == 1
        attends, puts = ("attends", "puts") if one else ("attend", "put")
        s = self.strength
        if self.to == "previous_token":
            if s == 1:
                return f"{who} {attends} only to the previous token (position 0 to itself)."
            return (f"{who} {attends} {s:g} to the previous token and {1 - s:g} to itself "
                    "(position 0 to itself).")
        if self.to == "perfect_match":
            return (f"at the query, {who} {puts} {s:g} on the label token(s) carrying the query's label and "
                    f"{1 - s:g} on the other label tokens, 0 elsewhere (an oracle; induction strength "
                    f"{2 * s - 1:g}); other rows as computed.")
        if self.to == "uniform":
            return f"{who} {attends} uniformly to every position up to its own."
        if self.to == "constant":
            return f"{words.where(c)} is set to {self.value:g}."
        return f"{words.where(c)} is set to the tensor in {self.file}."
