"""Finding a clamp kind's class: built-ins, entry points, or a dotted path.

Rules:
- A clamp mapping names its kind by ``kind``: a built-in (:data:`BUILTIN`: every module of
  :mod:`optolab.clamps.kinds` defines one; adding a kind is adding a module), an installed
  package's entry point in the group ``optolab.clamps``, or ``package.module:Class``. ``kind`` is recorded as written, so a run
  that used a plugin kind reloads (and resumes) wherever the plugin is importable.
- A kind class subclasses :class:`~optolab.clamps.kind.ClampSpec` (the interface and its rules
  are in :mod:`optolab.clamps.kind`). Anything else is refused with one line.
- Registering never edits optolab: a package adds, in its ``pyproject.toml``,
  ``[project.entry-points."optolab.clamps"] jitter = "mypkg.clamps:Jitter"``.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from optolab.clamps.kind import ClampSpec
from optolab.core.errors import OptolabError, from_validation_error
from optolab.core.plugins import builtins, entry_points, import_object, is_path, load_entry_point

BUILTIN: dict[str, type[ClampSpec]] = builtins("optolab.clamps.kinds", ClampSpec, "KIND")
ENTRY_POINT_GROUP = "optolab.clamps"


def _entry_points() -> dict:
    return entry_points(ENTRY_POINT_GROUP)


def known_kinds() -> list[str]:
    return sorted(set(BUILTIN) | set(_entry_points()))


def _check(cls: Any, where: str, field: str) -> type[ClampSpec]:
    if not (isinstance(cls, type) and issubclass(cls, ClampSpec)):
        raise OptolabError(f"{where} is not a clamp kind (got {cls!r}).", field=field,
                           fix="point at a class that subclasses optolab.clamps.kind.ClampSpec (or SiteClamp).")
    return cls


def clamp_class(kind: Any, field: str) -> type[ClampSpec]:
    """The class of clamp kind ``kind`` (as a protocol writes it)."""
    if not isinstance(kind, str):
        raise OptolabError(f"missing or not a string (got {kind!r}).", field=f"{field}.kind",
                           fix=f"set 'kind' to one of {known_kinds()}, or to package.module:Class.")
    if kind in BUILTIN:
        return BUILTIN[kind]
    eps = _entry_points()
    if kind in eps:
        return _check(load_entry_point(eps[kind], f"{field}.kind", "clamp kind"), f"entry point '{kind}'",
                      f"{field}.kind")
    if is_path(kind):
        return _check(import_object(kind, f"{field}.kind", "kind: mypkg.clamps:Jitter"), kind, f"{field}.kind")
    close = difflib.get_close_matches(kind, known_kinds(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise OptolabError(f"unknown clamp kind '{kind}'.", field=field,
                       fix=f"{hint}set 'kind' to one of {known_kinds()}, or name your own class with "
                           "'kind: package.module:Class' (a plug-in's kind is known once its package is "
                           "installed where optolab runs: docs/clamps.md).")


def validate_clamp(data: Any, field: str) -> ClampSpec:
    """One clamp mapping, validated by its kind's schema; errors name ``field.<key>``."""
    if isinstance(data, ClampSpec):
        return data
    if not isinstance(data, dict):
        raise OptolabError(f"each clamp must be a mapping with 'kind' (got {type(data).__name__}).", field=field,
                           fix="write e.g. - {kind: ablate, site: pattern1}")
    cls = clamp_class(data.get("kind"), field)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e, prefix=field, model=cls) from None


def validate_clamps(data: Any, field: str) -> list[ClampSpec]:
    """A ``clamps:`` list (None: no clamps); errors name ``field.<i>.<key>``."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise OptolabError(f"must be a list of clamps (got {type(data).__name__}).", field=field,
                           fix="write one '- {kind: …}' line per clamp.")
    return [validate_clamp(c, f"{field}.{i}") for i, c in enumerate(data)]
