"""Reading the small JSON files optolab writes (run metadata, checkpoint sidecars).

Rules:
- A file that cannot be read, is not JSON, or does not hold an object is *damaged*: one
  :class:`~optolab.core.errors.OptolabError` naming the file and the fix, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from optolab.core.errors import OptolabError


def read_json_object(path: Path, fix: str, field: str = "--out") -> dict:
    """The JSON object in ``path`` (see the module rules)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise OptolabError(f"'{path}' is damaged (not a readable JSON object).", field=field, fix=fix)
    return data
