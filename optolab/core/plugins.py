"""Loading plugins: every registry (tasks, clamp kinds, measures) finds classes the same way.

Rules:
- A name is a built-in, an entry point of the registry's group (read once per process), or a
  ``package.module:Class`` path, imported from the user's code.
- Anything that goes wrong while importing a user's module (an ImportError, a syntax error,
  anything it raises at import) is one :class:`~optolab.core.errors.OptolabError` naming the
  field, never a traceback.
- Built-ins are found, not listed: every module of a registry's package (``clamps/kinds/``,
  ``measures/builtin/``) defines its class, so adding one is adding a module (:func:`builtins`).
- Nothing is imported until a protocol asks for it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from functools import lru_cache
from typing import Any

from optolab.core.errors import OptolabError


@lru_cache(maxsize=None)
def entry_points(group: str) -> dict[str, Any]:
    """``name -> entry point`` of ``group`` (installed packages' ``[project.entry-points]``)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def is_path(name: str) -> bool:
    return ":" in name


def import_object(path: str, field: str, example: str) -> Any:
    """The object named by ``package.module:Name``."""
    if not isinstance(path, str):
        raise OptolabError(f"must be a string package.module:Class (got {path!r}).", field=field,
                           fix=f"write e.g. {example}")
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise OptolabError(f"'{path}' is not of the form package.module:Class.", field=field,
                           fix=f"write e.g. {example}")
    if module_name.startswith("."):
        raise OptolabError(f"'{module_name}' is a relative module name.", field=field,
                           fix="name the module from its top-level package, e.g. mypkg.tasks.")
    if module_name.rsplit(".", 1)[-1] == "__main__":
        raise OptolabError(f"'{module_name}' is a program's entry module: importing it would run the program.",
                           field=field, fix="point at the module that defines the class.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OptolabError(f"cannot import module '{module_name}' ({e}).", field=field,
                           fix="install the package that defines it, or put it on PYTHONPATH.") from None
    except SystemExit as e:  # a module that exits at import is a broken plugin, not a reason to stop optolab
        raise OptolabError(f"importing module '{module_name}' called exit ({e.code!r}).", field=field,
                           fix="fix that module: it should define classes, not run.") from None
    except Exception as e:  # a user's module failing at import is bad input, not an optolab bug
        raise OptolabError(f"importing module '{module_name}' failed ({type(e).__name__}: {e}).", field=field,
                           fix="fix the error in that module.") from None
    if not hasattr(module, attr):
        raise OptolabError(f"module '{module_name}' has no '{attr}'.", field=field,
                           fix="check the class name after the colon.")
    return getattr(module, attr)


def load_entry_point(ep: Any, field: str, what: str) -> Any:
    """What the entry point ``ep`` names (one line, no traceback, when its package fails)."""
    name = ep.name
    try:
        return ep.load()
    except Exception as e:  # as import_object: the plugin's own failure, reported in one line
        raise OptolabError(f"the entry point for {what} '{name}' fails to import ({type(e).__name__}: {e}).",
                           field=field, fix="reinstall the package that provides it.") from None


def builtins(package: str, base: type, key: str) -> dict[str, type]:
    """``name -> class`` for every class defined in a module of ``package`` that subclasses
    ``base`` and names itself by the class attribute ``key``; modules in name order."""
    pkg = importlib.import_module(package)
    found: dict[str, type] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__
                    and getattr(obj, key, None)):
                name = getattr(obj, key)
                if name in found:
                    raise RuntimeError(f"{package}: two classes are named {name!r}")  # an optolab bug
                found[name] = obj
    return found
