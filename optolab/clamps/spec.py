"""The ``clamps:`` section of a protocol: what to freeze, patch or ablate, where and when.

Rules:
- Each clamp is a mapping with a ``kind``; unknown keys are errors. Kinds: ``ablate``, ``set``,
  ``preserve``, ``perfect_copy``, ``layer_clamp``, ``graft``, ``freeze``, ``stop_gradient``,
  ``scale``, ``add``.
- ``site`` is a TransformerLens hook name (``blocks.0.attn.hook_pattern``) or a shorthand
  (``pattern0``, ``scores1``, ``v0``, ``z1``, ``result0``, ``attn_out0``, ``resid_post0``,
  ``embed``). Whether it exists is checked against the model when the protocol is compiled.
- ``heads`` selects along the head axis of per-head sites (``all`` or a list); ``positions``
  selects sequence positions (query rows for ``hook_pattern``/``hook_attn_scores``): ``all``,
  ``query`` (the last position), ``labels``/``exemplars`` (exemplar-label tasks) or a list of
  indices (negative counts from the end).
- ``window`` limits a clamp to a span of training: ``start`` ≤ step < ``stop`` (in ``unit``:
  steps or sequences; ``stop`` omitted = to the end). ``apply_at`` says whether it acts on
  training steps, evaluations, or both (the default).
- Nothing here looks at the model or the task; :mod:`optolab.clamps.compile` does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from optolab.counts import Count
from optolab.errors import SpecError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Heads = Union[Literal["all"], list[Annotated[int, Field(strict=True)]]]
Positions = Union[Literal["all", "query", "labels", "exemplars"], list[Annotated[int, Field(strict=True)]]]


class Window(Strict):
    start: Count = 0
    stop: Count | None = Field(None, description="exclusive; omitted = the end of training")
    unit: Literal["sequences", "steps"] = "sequences"

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.stop is not None and self.stop <= self.start:
            raise SpecError("stop", f"window.stop ({self.stop}) must be greater than window.start ({self.start}).",
                            "swap them, or omit stop to clamp until the end of training.")
        return self


def _no_empty(v: Any) -> Any:
    if isinstance(v, list) and not v:
        raise SpecError("", "an empty list selects nothing.", "omit the field (all), or list at least one index.")
    return v


class ClampBase(Strict):
    name: str | None = Field(None, description="a label for plots and messages")
    window: Window = Field(default_factory=Window)
    apply_at: Literal["train", "eval", "both"] = "both"


class SiteClamp(ClampBase):
    site: str
    heads: Annotated[Heads, BeforeValidator(_no_empty)] = "all"
    positions: Annotated[Positions, BeforeValidator(_no_empty)] = "all"


class Ablate(SiteClamp):
    """Replace the selected entries: ``zero``; ``mean`` over the batch being run (per position,
    detached); ``resample`` from the next sequence in the batch (detached)."""

    kind: Literal["ablate"]
    how: Literal["zero", "mean", "resample"] = "zero"


class SetTo(SiteClamp):
    """Force the selected entries to a built-in pattern, a constant or a tensor file."""

    kind: Literal["set"]
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


class Preserve(SiteClamp):
    """Two passes: record ``site`` from an unclamped pass, then force it while the other clamps
    act. Where another clamp writes the same entries, the other clamp wins."""

    kind: Literal["preserve"]


class PerfectCopy(ClampBase):
    """The logits at the query become the head's pre-softmax scores query → label tokens
    (every other label −1e9), so only that head's QK path and what feeds it learn."""

    kind: Literal["perfect_copy"]
    layer: Annotated[int, Field(strict=True, ge=0)]
    head: Annotated[int, Field(strict=True, ge=0)]


class LayerClamp(ClampBase):
    """A named multi-pass recipe. ``perfect_prev_token_input``: the output of ``layer`` is
    replaced by the embeddings shifted one position right (pass b, whose next-layer patterns are
    recorded) and by the embeddings themselves (pass c, with those patterns forced). With
    ``copy_head``, the logits come from that next-layer head's scores in pass b instead."""

    kind: Literal["layer_clamp"]
    recipe: Literal["perfect_prev_token_input"] = "perfect_prev_token_input"
    layer: Annotated[int, Field(strict=True, ge=0)] = 0
    copy_head: Annotated[int, Field(strict=True, ge=0)] | None = None


class Graft(SiteClamp):
    """``site`` takes its value from a frozen model: another run's checkpoint, run on the same
    batch without clamps."""

    kind: Literal["graft"]
    source: str = Field(description="a run directory or a checkpoint .safetensors file")
    step: Count | None = Field(None, description="checkpoint step in a run directory (default: the last)")


class Freeze(ClampBase):
    """A parameter (or some heads of it) gets no update while the window is open; with
    ``source``, it is first set to that checkpoint's values."""

    kind: Literal["freeze"]
    param: str = Field(description="a parameter name, e.g. blocks.0.attn.W_V")
    heads: Annotated[Heads, BeforeValidator(_no_empty)] = "all"
    source: str | None = None
    step: Count | None = None

    @model_validator(mode="after")
    def _train_only(self) -> Freeze:
        if self.apply_at == "eval":
            raise SpecError("apply_at", "freeze acts on training updates only.",
                            "remove apply_at or set it to train or both.")
        return self


class StopGradient(SiteClamp):
    """Forward unchanged; no gradient flows back through the selected entries."""

    kind: Literal["stop_gradient"]


class Scale(SiteClamp):
    """Multiply the selected entries (e.g. an inverse temperature on attention scores)."""

    kind: Literal["scale"]
    factor: float


class Add(SiteClamp):
    kind: Literal["add"]
    value: float


AnyClamp = Annotated[
    Union[Ablate, SetTo, Preserve, PerfectCopy, LayerClamp, Graft, Freeze, StopGradient, Scale, Add],
    Field(discriminator="kind"),
]
CLAMP_KINDS = frozenset(["ablate", "set", "preserve", "perfect_copy", "layer_clamp", "graft", "freeze",
                         "stop_gradient", "scale", "add"])
