"""The measures a protocol can switch on: built-ins and entry points, and the ``measures:``
schema made from them.

Rules:
- Built-in measures are :data:`BUILTIN`: every module of :mod:`optolab.measures.builtin` defines
  one (adding a measure is adding a module).
  An installed package adds its own with an entry point in the group ``optolab.measures``
  (``[project.entry-points."optolab.measures"] my_score = "mypkg.measures:MyScore"``); they are
  read once, when the protocol schema is built.
- The ``measures:`` section is :class:`MeasuresBase` (schedule, eval set size, which splits) plus, per measure,
  a switch ``<NAME>: bool`` (default ``DEFAULT``). A measure with a ``CONFIG`` (one that runs at
  checkpoints) takes ``<NAME>: false | true | {its fields}`` instead, resolved to ``null`` or the
  full mapping; so does an installed (entry-point) measure with ``OPTIONS``: its options are
  **namespaced** under its own name (``measures.my_score: {max_lag: 4}``), so two packages, or a
  package and optolab, may both have a ``max_lag`` (on c9baccf a plug-in option named like a
  built-in's made every protocol fail to validate). A measure reads its options with
  :meth:`~optolab.measures.measure.Measure.options`. Built-in measures' options keep their
  flat names (``measures.max_lag``: every protocol written so far has them); a test keeps those
  apart. Unknown keys are errors.
- Measures run in the order of their modules' names, then entry points by name.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, create_model

from optolab.core.counts import PosCount
from optolab.core.errors import OptolabError
from optolab.core.plugins import builtins, entry_points, load_entry_point
from optolab.core.schedule import Schedule
from optolab.core.strict import StrictModel
from optolab.measures.measure import Curve, Measure

BUILTIN: dict[str, type[Measure]] = builtins("optolab.measures.builtin", Measure, "NAME")
ENTRY_POINT_GROUP = "optolab.measures"


class MeasuresBase(StrictModel):
    schedule: Schedule = Field(default_factory=Schedule)
    eval_sequences: PosCount = Field(1000, description="sequences per eval split")
    per_example: bool = Field(True, description="keep each scored position's loss at every eval "
                                                "(RUN_DIR/per_example/, float16; optolab.training.per_example)")
    per_example_max: PosCount = Field(4096, description="the first this many scored positions of each split")
    splits: list[str] | None = Field(None, min_length=1,
                                     description="evaluate only these of the task's eval splits (the main split "
                                                 "among them); default every split. Training is unchanged.")


def _check(cls: Any, name: str) -> type[Measure]:
    if not (isinstance(cls, type) and issubclass(cls, Measure) and cls.NAME == name):
        raise OptolabError(f"the entry point '{name}' of {ENTRY_POINT_GROUP} is not a Measure named '{name}' "
                           f"(got {cls!r}).", field=f"measures.{name}",
                           fix="point the entry point at a subclass of optolab.measures.measure.Measure with that NAME.")
    return cls


@lru_cache(maxsize=1)
def measures() -> dict[str, type[Measure]]:
    """Every measure this installation knows, in run order."""
    found = dict(BUILTIN)
    for name, ep in sorted(entry_points(ENTRY_POINT_GROUP).items()):
        if name not in found:
            found[name] = _check(load_entry_point(ep, f"measures.{name}", "measure"), name)
    return found


@lru_cache(maxsize=1)
def measures_spec() -> type[MeasuresBase]:
    """The schema of a protocol's ``measures:`` section (see the module rules)."""
    fields: dict[str, Any] = {}
    for name, m in measures().items():
        if m.CONFIG is not None:
            fields[name] = (Annotated[m.CONFIG | None, BeforeValidator(_switch)],
                            Field(m.CONFIG() if m.DEFAULT else None, description=m.DOC or None))
            continue
        if m.OPTIONS and name not in BUILTIN:  # a plug-in's options live under its own name
            options = create_model(f"{type(m()).__name__}Options", __base__=StrictModel, **m.OPTIONS)
            fields[name] = (Annotated[options | None, BeforeValidator(_switch)],
                            Field(options() if m.DEFAULT else None, description=m.DOC or None))
            continue
        fields[name] = (bool, Field(m.DEFAULT, description=m.DOC or None))
        for option, (tp, info) in m.OPTIONS.items():
            if option in fields:  # built-ins only: a test keeps their flat names apart
                raise OptolabError(f"measure '{name}' declares option '{option}', which another measure has.",
                                   field=f"measures.{option}", fix="give the option a name of its own.")
            fields[option] = (tp, info)
    clash = sorted(set(fields) & set(MeasuresBase.model_fields))
    if clash:
        raise OptolabError(f"a measure or option is named '{clash[0]}', a field of measures: itself.",
                           field=f"measures.{clash[0]}", fix="give the measure another NAME.")
    return create_model("MeasuresSpec", __base__=MeasuresBase, **fields)


def _switch(v: Any) -> Any:
    """``true`` is the measure's defaults, ``false`` is off (a YAML boolean is a switch here,
    never a number)."""
    if v is True:
        return {}
    if v is False:
        return None
    return v


def curves(role: str) -> list[Curve]:
    """Every installed measure's curves of ``role``, in run order (:class:`Curve`)."""
    return [c for m in measures().values() for c in m.CURVES if c.role == role]


def at_checkpoints(spec) -> list[tuple[Measure, Any]]:
    """The measures that run at checkpoints and are switched on, with their configs."""
    return [(m(), getattr(spec, name)) for name, m in measures().items()
            if m.CONFIG is not None and getattr(spec, name) is not None]


def active(spec) -> list[Measure]:
    """The measures ``spec`` (a protocol's ``measures:``) switches on for every eval, ready to run."""
    return [m() for name, m in measures().items() if m.CONFIG is None and getattr(spec, name)]


