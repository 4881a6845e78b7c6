"""Reading the small JSON files optolab writes (run metadata, checkpoint sidecars, the
JSON-lines logs of metrics and per-example losses).

Rules:
- A file that cannot be read, is not JSON, or does not hold an object is *damaged*: one
  :class:`~optolab.core.errors.OptolabError` naming the file and the fix, never a traceback.
- In a JSON-lines log, a line that is not JSON was torn by a kill and is skipped; a line that is
  JSON but not a row (an object with an integer ``step``) is damage, reported with its line.
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


def read_jsonl_rows(path: Path, fix: str, field: str = "--out", *, stop_at_torn: bool = False) -> list[dict]:
    """The rows of a JSON-lines log (``[]`` when absent), each an object with an integer
    ``step``. A line that is not JSON was torn by an interrupted write and is skipped (with
    ``stop_at_torn``, it and everything after it); a line that is JSON but not such a row is
    damage: one error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OptolabError(f"'{path}' cannot be read ({getattr(e, 'strerror', None) or e}).", field=field,
                           fix=fix) from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if stop_at_torn:
                break
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise OptolabError(f"line {number} is not a row of this log (got {line[:40]!r}): the file is damaged.",
                               field=field, source=path, line=number, fix=fix)
        rows.append(row)
    return rows
