"""Stop at the answer in sweeps: the sweep file's ``stop_at_answer`` section, turned into each
run's ``train.stop`` (:mod:`optolab.training.stopping`).

Rules:
- ``stop_at_answer: {loss, margin_evals, cap}`` (or ``true`` for the defaults, ``false`` for
  off). Default: **on for design sweeps** (a ``design:`` section: screens, window scans, doses
  ask when a loss crosses), off otherwise. Every run then stops ``margin_evals`` evals after
  its main loss first falls to ``loss`` or below.
- ``cap`` (default 3): a run of any condition but the reference that has not crossed by ``cap``
  × the reference's median crossing at its grid point (interpolated, from the reference's
  finished runs) stops there, censored. So the reference's runs train first (as for
  ``dense_evals``) and the others wait for them; a reference whose median never crossed gives
  no cap (those runs go to their budget). ``cap: null`` trains everything at once, uncapped.
- Runs stopped so are finished for the sweep (skipped on a re-run) and censored or timed in the
  report, never dropped. With ``stop_at_answer: false`` a re-run resumes them to their full
  budget from the checkpoint at their stop.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from optolab.core.counts import Count
from optolab.core.strict import StrictModel


class StopAtAnswerSpec(StrictModel):
    """``stop_at_answer:`` of a sweep file (module rules)."""

    enabled: bool = Field(True, description="false: every run trains to its budget (`stop_at_answer: false`)")
    loss: float = Field(0.5, gt=0, description="the question: the main loss's first crossing of this")
    margin_evals: Count = Field(3, description="evals kept after the crossing")
    cap: float | None = Field(3.0, gt=1, description="censor other conditions' runs at cap x the reference's "
                                                     "median crossing (null: no cap)")


def as_section(value: Any) -> Any:
    """``true``/``false`` as the section they stand for (before validation)."""
    return {"enabled": value} if isinstance(value, bool) else value


def resolve(value: StopAtAnswerSpec | None, has_design: bool) -> StopAtAnswerSpec | None:
    """The sweep's rule: the section as written (``false``: off), absent -> on for design sweeps."""
    if value is None:
        return StopAtAnswerSpec() if has_design else None
    return value if value.enabled else None


def rule(spec: StopAtAnswerSpec, cap_sequences: int | None) -> dict:
    """A run's ``train.stop``."""
    return {"metric": "loss", "threshold": spec.loss, "direction": "down", "margin_evals": spec.margin_evals,
            "cap_sequences": cap_sequences}


def cap_sequences(spec: StopAtAnswerSpec, reference_times: list[float | None]) -> int | None:
    """``cap`` × the reference's median crossing (``None`` = never counts as later than all)."""
    from optolab.experiments.stats import median

    if spec.cap is None or not reference_times:
        return None
    m = median(reference_times)
    return None if m is None else max(1, math.ceil(spec.cap * m))


StopAtAnswerField = Annotated[StopAtAnswerSpec | None, BeforeValidator(as_section)]
