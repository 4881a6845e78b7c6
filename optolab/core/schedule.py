"""Schedules: when a run evaluates or checkpoints, in sequences or steps.

Rules:
- A schedule fires at multiples of ``every``, at multiples of each ``dense`` stage's cadence
  until that stage's ``until`` (denser early on), at ``per_decade`` log-spaced points per decade
  from 1,000 units to the end (rounded to 2 significant digits, so 1,000, 1,800, 3,200, 5,600,
  10,000, … with 4 per decade), and at the ``at`` points; always at 0 and at the end of
  training.
- Points in ``sequences`` fire at the first step whose sequence count reaches them
  (``step = ceil(sequences / batch_size)``), as in the authors' loop.
- A schedule that would fire more than :data:`MAX_SCHEDULE_POINTS` times is refused.
- A :class:`Window` is a span of training, ``[start, stop)`` in sequences or steps (``stop``
  omitted: to the end), as clamps (``window``) and data schedules (``data.phases.<i>.window``)
  write it; each converts it to steps its own way.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from optolab.core.counts import Count, PosCount
from optolab.core.errors import OptolabError, SpecError
from optolab.core.strict import StrictModel

MAX_SCHEDULE_POINTS = 100_000


class Window(StrictModel):
    """A span of training (see the module rules)."""

    start: Count = 0
    stop: Count | None = Field(None, description="exclusive; omitted = the end of training")
    unit: Literal["sequences", "steps"] = "sequences"

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.stop is not None and self.stop <= self.start:
            raise SpecError("stop", f"window.stop ({self.stop}) must be greater than window.start ({self.start}).",
                            "swap them, or omit stop to run until the end of training.")
        return self


class DenseStage(StrictModel):
    until: PosCount
    every: PosCount


class Schedule(StrictModel):
    unit: Literal["sequences", "steps"] = "sequences"
    every: PosCount = 10_000
    dense: list[DenseStage] = Field(default_factory=list, description="denser cadence early on")
    at: list[Count] = Field(default_factory=list, description="extra points")
    per_decade: PosCount | None = Field(None, le=100, description="log-spaced points per decade from 1,000 units")

    def steps(self, batch_size: int, total_steps: int, field: str) -> list[int]:
        """The sorted steps at which this schedule fires (always 0 and ``total_steps``)."""
        per = batch_size if self.unit == "sequences" else 1
        end = total_steps * per
        stages = [(s.until, s.every) for s in self.dense] + [(end, self.every)]
        n_points = sum(min(until, end) // every for until, every in stages)
        if n_points > MAX_SCHEDULE_POINTS:
            raise OptolabError(
                f"this schedule would fire about {n_points:,} times over {end:,} {self.unit}.",
                field=f"{field}.every", fix=f"use a larger 'every' (at most {MAX_SCHEDULE_POINTS:,} points).")
        points = {0, end}
        start = 0  # each stage fires at multiples of its own cadence, from where the last ended
        for stage in sorted(self.dense, key=lambda s: s.until):
            points.update(p for p in range(0, min(stage.until, end) + 1, stage.every) if p >= start)
            start = stage.until
        points.update(p for p in range(0, end + 1, self.every) if p >= start)
        if self.per_decade:
            k = 0
            while (p := 1000 * 10 ** (k / self.per_decade)) <= end:
                points.add(int(float(f"{p:.2g}")))
                k += 1
        for i, p in enumerate(self.at):
            if p > end:
                raise OptolabError(
                    f"point {p} {self.unit} is past the end of training ({end} {self.unit}).",
                    field=f"{field}.at.{i}", fix=f"use points <= {end} or train longer.")
            points.add(p)
        return sorted({math.ceil(p / per) for p in points})
