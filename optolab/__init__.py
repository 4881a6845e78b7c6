"""optolab: train small transformers on synthetic tasks while clamp protocols intervene.

The notebook API mirrors the CLI: ``load_protocol``, ``run``, ``open_run`` (see
:mod:`optolab.api`). The packages are the layers of the code (docs/architecture.md): ``core``,
``tasks``, ``model``, ``clamps`` and ``measures``, ``spec``, ``training``, ``experiments``.

Importing optolab is cheap: the names below load their modules (and torch, pandas, …) on first
use, so ``optolab --help`` and the pytest plugin start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {"Run": "optolab.api", "open_run": "optolab.api", "run": "optolab.api",
         "load_protocol": "optolab.protocol.loader", "OptolabError": "optolab.core.errors"}
__all__ = ["OptolabError", "Run", "__version__", "load_protocol", "open_run", "run"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optolab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
