"""The base of every schema optolab reads from YAML: strict keys, and numbers that are numbers.

Rules:
- Unknown keys are errors (``extra="forbid"``); models are frozen; NaN and infinities are refused.
- A field typed ``int`` or ``float`` (also inside ``Optional``, ``Annotated`` and tuples, like
  Adam's betas) takes numbers only. YAML 1.1 turns ``yes``/``no``/``on``/``off`` into booleans
  and ``2024-01-01`` into a date: both are refused with the field and the fix, never read as
  1, 0 or a timestamp. A string is refused too, except a number in exponent form, which YAML
  1.1 (PyYAML) leaves a string unless it has a dot and a signed exponent: ``1e-3`` and ``1e6``
  are numbers; ``"5"``, ``"abc"`` or ``"5 layers"`` are not.
- An ``int`` field takes whole numbers (``1e6`` and ``3.0`` included); a ``float`` field any
  finite number within float32's range (the model trains in float32: ``1e39`` would become inf).
- ``bool`` fields take YAML's booleans only (``true``/``false``, ``yes``/``no``, ``on``/``off``):
  a number or a quoted string is refused, not read as true (a field that also allows named
  values, like ``compile: auto``, takes those names too); ``str`` fields are not touched.
"""

from __future__ import annotations

import datetime
import math
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from optolab.core.errors import SpecError

FLOAT32_MAX = 3.4028234663852886e38
EXPONENT_FORM = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+")


def numeric_kind(annotation: Any) -> str | None:
    """``"int"``, ``"float"`` or ``"tuple"`` (of floats) when a field holds numbers, else None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return numeric_kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {numeric_kind(a) for a in typing.get_args(annotation) if a is not type(None)}
        return next(iter(kinds)) if len(kinds) == 1 else None
    if origin is tuple and all(numeric_kind(a) == "float" for a in typing.get_args(annotation)):
        return "tuple"
    if annotation is float:
        return "float"
    if annotation is int:
        return "int"
    return None


def _number(v: Any, kind: str) -> Any:
    fix = "use a whole number, e.g. 32 (no quotes, no units)." if kind == "int" else \
        "write a number without quotes or units, e.g. 1e-3."
    if isinstance(v, bool):
        raise SpecError("", f"a YAML boolean ({str(v).lower()}: yes/no/on/off/true/false) is not a number.", fix)
    if isinstance(v, (datetime.date, datetime.datetime)):
        raise SpecError("", f"YAML reads {v} as a date, not a number.", fix)
    if isinstance(v, str):
        text = v.strip()
        if not EXPONENT_FORM.fullmatch(text):
            raise SpecError("", f"'{v}' is text, not a number.", fix)
        v = float(text.replace("_", ""))
        if kind == "int" and v.is_integer() and abs(v) < 2**63:
            v = int(v)
    if kind == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
        if math.isfinite(v) and abs(v) > FLOAT32_MAX:
            raise SpecError("", f"{v:g} is outside float32's range (±{FLOAT32_MAX:.3g}): it would train as inf.",
                            "use a smaller number.")
    return v


def boolean_words(annotation: Any) -> frozenset[str] | None:
    """For a field that takes booleans: the strings it takes too (its ``Literal`` values); None
    for any other field."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return boolean_words(typing.get_args(annotation)[0])
    if annotation is bool:
        return frozenset()
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if bool in args:
            return frozenset(w for a in args if typing.get_origin(a) is typing.Literal
                             for w in typing.get_args(a) if isinstance(w, str))
    return None


def _boolean(v: Any, words: frozenset[str]) -> Any:
    if isinstance(v, bool) or (isinstance(v, str) and v in words):
        return v
    also = "".join(f" or {w}" for w in sorted(words))
    raise SpecError("", f"{v!r} is not true or false.", f"write true or false{also} (no quotes).")


class StrictModel(BaseModel):
    """A schema read from YAML (see the module rules)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        words = boolean_words(field.annotation) if field is not None else None
        if words is not None and v is not None:
            return _boolean(v, words)
        kind = numeric_kind(field.annotation) if field is not None else None
        if kind is None or v is None:
            return v
        if kind == "tuple":
            return [_number(x, "float") for x in v] if isinstance(v, (list, tuple)) else v
        return _number(v, kind)
