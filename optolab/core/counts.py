"""Whole-number fields that accept ``1e6``-style values (shared by protocols and clamps)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def _count(v: Any) -> Any:
    """Accept 1e6 / "1e6" / 1000000.0 for whole-number counts; leave the rest to pydantic."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            v = float(v.replace("_", ""))
        except ValueError:
            return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Count = Annotated[int, BeforeValidator(_count), Field(ge=0)]
PosCount = Annotated[int, BeforeValidator(_count), Field(gt=0)]
MAX_SEED = 2**63 - 1  # torch generators take seeds below 2**64; derived seeds add to them
Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)]
