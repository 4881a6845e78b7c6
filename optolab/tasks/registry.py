"""Finding a task class for a spec: built-ins, entry points, or a dotted path.

Rules:
- A spec mapping names its task by ``kind`` (a built-in, or an installed package's entry point
  in the group ``optolab.tasks``) or by ``generator: package.module:TaskClass``. With
  ``generator`` the class is imported from the user's code; ``kind`` may then be left out.
- A task class is a subclass of :class:`~optolab.tasks.base.Task` with ``kind`` and ``Spec`` (a
  :class:`~optolab.tasks.base.TaskSpec` subclass whose ``kind`` is ``Literal[that kind]``).
  Anything else is refused with a message saying what the class lacks.
- Built-ins are found, not listed: every module of :mod:`optolab.tasks` that defines a Task
  subclass with a ``kind`` adds it. Nothing of a user's is imported until a spec asks for it;
  entry points are read once per process.
- Registering never edits optolab: a package adds, in its ``pyproject.toml``,
  ``[project.entry-points."optolab.tasks"] mytask = "mypkg.tasks:MyTask"``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from optolab.core.errors import OptolabError, from_validation_error
from optolab.core.plugins import builtins, entry_points, import_object, load_entry_point
from optolab.tasks.base import Task, TaskSpec

# every module of optolab.tasks that defines a class with a ``kind``: adding a built-in task is
# adding its module (optolab.core.plugins.builtins); the abstract bases (Task, NextTokenTask,
# HeldOutClassesTask) name no kind and are skipped
BUILTIN: dict[str, type[Task]] = builtins("optolab.tasks", Task, "kind")
ENTRY_POINT_GROUP = "optolab.tasks"


def _entry_points() -> dict:
    return entry_points(ENTRY_POINT_GROUP)


def known_kinds() -> list[str]:
    return sorted(set(BUILTIN) | set(_entry_points()))


def _check_class(cls: Any, where: str, field: str) -> type[Task]:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise OptolabError(f"{where} is not a Task subclass (got {cls!r}).", field=field,
                           fix="point at a class that subclasses optolab.tasks.Task.")
    spec = getattr(cls, "Spec", None)
    if not (isinstance(spec, type) and issubclass(spec, TaskSpec)):
        raise OptolabError(f"task class {where} has no Spec.", field=field,
                           fix="give the class `Spec = MySpec`, a subclass of optolab.tasks.TaskSpec.")
    if not isinstance(getattr(cls, "kind", None), str):
        raise OptolabError(f"task class {where} has no kind.", field=field,
                           fix="give the class `kind = \"mytask\"` (and the Spec `kind: Literal[\"mytask\"]`).")
    return cls


def import_generator(path: str, field: str = "task.generator") -> type[Task]:
    """The class named by ``package.module:Class``."""
    return _check_class(import_object(path, field, "generator: mypkg.tasks:MyTask"), path, field)


def task_class(kind: str | None, generator: str | None = None, field: str = "task") -> type[Task]:
    """The task class for a ``kind`` or a ``generator`` path."""
    if generator is not None:
        cls = import_generator(generator, _at(field, "generator"))
        if kind is not None and kind != cls.kind:
            raise OptolabError(f"kind '{kind}' does not match {generator}'s kind '{cls.kind}'.",
                               field=_at(field, "kind"), fix=f"remove kind or set it to '{cls.kind}'.")
        return cls
    if kind is None:
        raise OptolabError("missing.", field=_at(field, "kind"),
                           fix=f"add 'kind: <one of {known_kinds()}>' or 'generator: package.module:Class'.")
    if not isinstance(kind, str):
        raise OptolabError(f"must be a string (got {kind!r}).", field=_at(field, "kind"),
                           fix=f"use one of {known_kinds()}.")
    if kind in BUILTIN:
        return BUILTIN[kind]
    eps = _entry_points()
    if kind in eps:
        cls = load_entry_point(eps[kind], _at(field, "kind"), "task")
        return _check_class(cls, f"entry point '{kind}'", _at(field, "kind"))
    import difflib

    close = difflib.get_close_matches(str(kind), known_kinds(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise OptolabError(f"unknown task kind '{kind}'.", field=_at(field, "kind"),
                       fix=f"{hint}use one of {known_kinds()}, or name your own class with "
                           "'generator: package.module:Class'.")


def _at(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def validate_task_spec(data: Any, *, field: str = "task", source: str | None = None,
                       lines: dict | None = None) -> TaskSpec:
    """Validate a task mapping against its class's ``Spec``; errors name ``field.<key>``."""
    if isinstance(data, TaskSpec):
        return data
    if not isinstance(data, dict):
        raise OptolabError(f"must be a mapping with 'kind' (got {type(data).__name__}).", field=field or None,
                           source=source, fix="write e.g. task: {kind: repeat_tokens, n_tokens: 64}")
    try:
        cls = task_class(data.get("kind"), data.get("generator"), field)
        return cls.Spec.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e, source=source, prefix=field,
                                    lines=lines, model=cls.Spec) from None
    except OptolabError as e:
        raise (e.located(source, lines) if source else e) from None


def _defined_for(spec_cls: type[TaskSpec]) -> type[Task] | None:
    """An already-imported Task class whose ``Spec`` is exactly ``spec_cls``."""
    todo = list(Task.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__dict__.get("Spec") is spec_cls:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def make_task(spec: TaskSpec) -> Task:
    """The task a validated spec describes: by ``generator``, by ``kind``, or (for a spec built
    in Python from an imported class) the class whose ``Spec`` it is."""
    if spec.generator is None and spec.kind not in BUILTIN:
        cls = _defined_for(type(spec))
        if cls is not None:
            return cls(spec)
    return task_class(spec.kind, spec.generator)(spec)
