"""One error type for everything a user can get wrong.

Rules:
- Anything caused by user input (a protocol, a task spec, a CLI flag, a run directory) raises
  :class:`OptolabError`. Bugs in optolab raise ordinary exceptions.
- An ``OptolabError`` names *where* (file, field path, line when YAML gives one), *what* is wrong
  and *how to fix it*. The CLI prints ``str(err)`` as one line and exits with code 2.
- Pydantic validation errors are translated here, once, so every schema speaks the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


class OptolabError(Exception):
    """A user-facing error: one line saying where, what, and the fix."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        fix: str | None = None,
        source: str | Path | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.field = field
        self.fix = fix
        self.source = str(source) if source is not None else None
        self.line = line
        super().__init__(self.format())

    def format(self) -> str:
        where = self.source or ""
        if where and self.line is not None:
            where += f":{self.line}"
        parts = [p for p in (where, self.field) if p]
        text = ": ".join(parts + [self.message]) if parts else self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return " ".join(text.split())  # always one line

    def located(self, source: str | Path | None, lines: Mapping[tuple, int] | None = None) -> OptolabError:
        """The same error with a file (and a line looked up from the field path) attached."""
        line = self.line
        if line is None and lines is not None and self.field:
            line = lookup_line(lines, self.field)
        return OptolabError(self.message, field=self.field, fix=self.fix, source=source, line=line)


class RunFailed(OptolabError):
    """A run that stopped on its own (it diverged): not bad input, so the CLI exits 1."""

    exit_code = EXIT_RUN_FAILED


class SpecError(ValueError):
    """Raised inside a pydantic validator that checks several fields together: names the field
    to blame and the fix, so the translated error is as precise as a single-field one."""

    def __init__(self, field: str, message: str, fix: str) -> None:
        self.field, self.message, self.fix = field, message, fix
        super().__init__(f"{message} Fix: {fix}")


# --- YAML line numbers -------------------------------------------------------------------


def yaml_line_map(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number (best effort)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                kpath = path + (key.value,)
                out[kpath] = key.start_mark.line + 1
                walk(value, kpath)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return out


def duplicate_key(text: str) -> tuple[str, int, int] | None:
    """``(dotted path, first line, repeated line)`` of the first key written twice in one
    mapping (YAML silently keeps the last one, which hides typos), or None."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None

    def walk(node: Any, path: tuple) -> tuple[str, int, int] | None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                line = key.start_mark.line + 1
                if key.value in seen:
                    return ".".join(map(str, path + (key.value,))), seen[key.value], line
                seen[key.value] = line
                found = walk(value, path + (key.value,))
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found = walk(item, path + (i,))
                if found:
                    return found
        return None

    return walk(root, ()) if root is not None else None


def lookup_line(lines: Mapping[tuple, int], dotted: str) -> int | None:
    """The line of ``dotted`` (e.g. ``train.lr`` or ``measures.schedule.at.0``), or of its
    nearest ancestor present in the file."""
    table = {tuple(str(p) for p in key): line for key, line in lines.items()}
    parts = dotted.split(".")
    while parts:
        if tuple(parts) in table:
            return table[tuple(parts)]
        parts.pop()
    return None


# --- pydantic ------------------------------------------------------------------------------


def _fix_for(err: Mapping[str, Any], allowed: Sequence[str]) -> str:
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    loc = err.get("loc") or ()
    name = str(loc[-1]) if loc else "the field"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(name, list(allowed), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        listing = ", ".join(sorted(allowed)) if allowed else "none"
        return f"{hint}Remove '{name}' or use one of the allowed keys: {listing}."
    if kind == "missing":
        return f"add '{name}' to this section."
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        bound = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        limit = ctx.get("gt", ctx.get("ge", ctx.get("lt", ctx.get("le"))))
        return f"use a value {bound} {limit}."
    if kind.startswith("int_"):
        return "use a whole number, e.g. 0 (no quotes, no decimal point)."
    if kind == "finite_number":
        return "use a finite number (no nan or inf), e.g. 2.0."
    if kind.startswith("float_"):
        return "use a number, e.g. 1e-3."
    if kind.startswith("bool"):
        return "use true or false."
    if kind in {"literal_error", "enum"}:
        return f"use one of {ctx.get('expected', 'the listed values')}."
    if kind == "string_pattern_mismatch":
        return "use only letters, digits and the characters _ . + - (no spaces)."
    if kind.startswith("string"):
        return "use a string."
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        return "write a mapping (key: value lines) here."
    if kind.startswith("list") or kind.startswith("tuple"):
        return "write a list, e.g. [1, 2]."
    if kind in {"union_tag_invalid", "union_tag_not_found"}:
        return f"set 'kind' to one of {ctx.get('expected_tags', 'the known kinds')}."
    if kind == "value_error":
        return ""
    return "see docs/protocols.md for the expected form."


def from_validation_error(exc: Any, *, source: str | Path | None = None, prefix: str = "",
                          lines: Mapping[tuple, int] | None = None, model: Any = None,
                          tags: frozenset[str] = frozenset(),
                          flags: Mapping[str, str] | None = None) -> OptolabError:
    """Turn the first pydantic error into an :class:`OptolabError` (one line, one fix).

    ``tags`` are discriminator values that pydantic puts into locations (``task.fewshot.dim``);
    they are dropped so the path is the one the user wrote (``task.dim``). ``flags`` names the
    command-line flag a field came from (``{"step_size": "--step-size"}``): settings given on the
    command line are blamed on the flag the user typed, not on the schema's field.
    """
    if flags is not None:
        e = from_validation_error(exc, model=model, tags=tags)
        return OptolabError(e.message, field=flags.get(e.field or "", e.field), fix=e.fix, source=source)
    # an unknown key first: a misspelt key is why the field it meant is "missing"
    errs = sorted(exc.errors(include_url=False), key=lambda e: e.get("type") != "extra_forbidden")
    err = errs[0]
    raw = list(err.get("loc", ()))
    # a tag sits where a union was chosen: first, after 'task', or after a list index
    loc = [str(p) for k, p in enumerate(raw)
           if not str(p).startswith("function-")
           and not (str(p) in tags and (k == 0 or raw[k - 1] == "task" or isinstance(raw[k - 1], int)))]
    spec_error = (err.get("ctx") or {}).get("error")
    if isinstance(spec_error, SpecError):
        field = ".".join(([prefix] if prefix else []) + loc + ([spec_error.field] if spec_error.field else []))
        more = f" ({len(errs) - 1} more problem(s) after this one)" if len(errs) > 1 else ""
        return OptolabError(spec_error.message + more, field=field, fix=spec_error.fix).located(source, lines)
    field = ".".join(([prefix] if prefix else []) + loc)
    allowed = _allowed_keys(model, raw) if model is not None else []
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if err.get("type") not in {"missing", "extra_forbidden"} and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    if err.get("type") == "extra_forbidden":
        msg = "unknown key" + _not_ascii(str(raw[-1]) if raw else "")
    more = f" ({len(errs) - 1} more problem(s) after this one)" if len(errs) > 1 else ""
    e = OptolabError(msg + "." + more, field=field or None, fix=_fix_for(err, allowed) or None)
    return e.located(source, lines)


def _not_ascii(key: str) -> str:
    """Where ``key`` holds characters that look like ASCII but are not (a Cyrillic 'а' in
    'trаin'), the words that name them; else ''."""
    import unicodedata

    odd = [c for c in dict.fromkeys(key) if not c.isascii()]
    if not odd:
        return ""
    named = ", ".join(f"'{c}' U+{ord(c):04X} {unicodedata.name(c, 'UNNAMED CHARACTER')}" for c in odd[:3])
    return f" '{key}': it holds {named}, not ASCII (retype the key)"


def _allowed_keys(model: Any, loc: Sequence[Any]) -> list[str]:
    """Field names of the pydantic model that owns the last key in ``loc``. List indices step
    into the item type; a union tag (``clamps.0.ablate``) picks the member with that ``kind``."""
    from pydantic import BaseModel

    cur: Any = model
    for part in list(loc)[:-1]:
        if isinstance(part, int):
            continue  # the item type was unwrapped with the list
        if isinstance(cur, list):  # union members: pick the one tagged ``part``
            cur = next((m for m in cur if _tag(m) == part), None)
            if cur is not None:
                continue
            return []
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(str(part))
        if field is None:
            return []
        cur = _unwrap(field.annotation)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _tag(model: Any) -> Any:
    """The ``kind`` literal of a discriminated-union member, or None."""
    from typing import get_args

    field = getattr(model, "model_fields", {}).get("kind")
    args = get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _unwrap(tp: Any) -> Any:
    """The pydantic model inside ``tp`` (through Optional/list/Annotated), or the list of
    members of a discriminated union of models."""
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    members = []
    for arg in get_args(tp):
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            members.append(inner)
        elif isinstance(inner, list):
            members.extend(inner)
    if len(members) == 1:
        return members[0]
    return members or tp
