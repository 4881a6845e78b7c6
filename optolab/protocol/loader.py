"""Reading protocols and task specs from YAML, with errors that point at the line.

Rules:
- ``yaml.safe_load`` only. A file must be UTF-8 and hold one mapping.
- Bounded before anything walks the document: at most :data:`MAX_FILE_BYTES`, nesting at most
  :data:`MAX_DEPTH` deep, at most :data:`MAX_VALUES` values once aliases are expanded (an alias
  bomb is refused in milliseconds), no alias that contains itself.
- Relative paths inside a protocol are resolved against the protocol file's folder.
- A protocol without ``name:`` is named after its file, made a valid name
  (:func:`name_from_file`).
- Every failure is an :class:`~optolab.core.errors.OptolabError` naming the file, the field path, the
  line where YAML gives one, and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from optolab.core.counts import MAX_SEED
from optolab.core.errors import OptolabError, duplicate_key, from_validation_error, yaml_line_map
from optolab.measures.evaluate import eval_splits
from optolab.protocol.conditions import condition_protocols, plan_condition
from optolab.protocol.data_schedule import check_data
from optolab.protocol.data_schedule import resolve_paths as resolve_data_paths
from optolab.protocol.footprint import check_footprint
from optolab.protocol.schema import Origin, Protocol
from optolab.tasks import make_task, validate_task_spec

MAX_FILE_BYTES = 1 << 20  # a protocol, task or sweep file is a few KB
MAX_DEPTH = 64
MAX_VALUES = 100_000


def _flow_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest outside quotes (a cheap bound before the parser recurses)."""
    depth = deepest = 0
    quote = None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
        elif ch == "\n":
            quote = None
    return deepest


def _bounded(text: str, path, what: str) -> None:
    """Refuse a document too deep, or too large once its aliases are expanded (module rules)."""
    if _flow_depth(text) > MAX_DEPTH:
        raise OptolabError(f"the {what} nests deeper than {MAX_DEPTH} levels.", source=path,
                           fix="protocols nest a few levels; check for a runaway [ or {.")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the parser's own error, with its line, is reported by the caller
    except RecursionError:
        raise OptolabError(f"the {what} is nested too deeply to read (over {MAX_DEPTH} levels).", source=path,
                           fix="protocols nest a few levels; check for a runaway [ or {.") from None
    if root is None:
        return
    size: dict[int, int] = {}  # node id -> values below it, aliases expanded
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    open_: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise OptolabError(f"the {what} nests deeper than {MAX_DEPTH} levels.", source=path,
                               line=node.start_mark.line + 1, fix="protocols nest a few levels; flatten it.")
        children = ([v for kv in node.value for v in kv] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_VALUES:
                raise OptolabError(f"the {what} expands to over {MAX_VALUES:,} values through its aliases (*name).",
                                   source=path, fix="protocols need no aliases; write the values out.")
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            raise OptolabError(f"an alias in the {what} contains itself.", source=path,
                               line=node.start_mark.line + 1, fix="remove the recursive alias.")
        open_.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in size)


def _absolute(path: Path) -> Path:
    """``path`` with its links resolved, or only made absolute where a link loops (the file's
    reader then says so in one line)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: a symbolic link loop, as Python 3.11 reports one
        return Path(os.path.abspath(path))


def read_yaml(path: str | Path, what: str = "file") -> tuple[dict, dict[tuple, int]]:
    """``(mapping, line map)`` of a YAML file, or an OptolabError saying what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise OptolabError(f"{what} not found (looked for {_absolute(p)}).", source=path,
                           fix="check the path; relative paths start from the current folder.")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise OptolabError(f"the {what} is {p.stat().st_size / 2**20:,.1f} MiB; optolab reads files of at most "
                           f"{MAX_FILE_BYTES // 2**20} MiB.", source=path,
                           fix="check that this is the file you meant (protocols are a few KB).")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OptolabError(f"not valid UTF-8 (byte {e.start}).", source=path,
                           fix="save the file as UTF-8 text.") from None
    except OSError as e:
        raise OptolabError(f"cannot read {what}: {e.strerror}.", source=path, fix="check permissions.") from None
    _bounded(text, path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise OptolabError(f"YAML syntax error: {problem}.", source=path,
                           line=mark.line + 1 if mark else None,
                           fix="check indentation, colons and quotes around that line.") from None
    dup = duplicate_key(text)
    if dup is not None:
        field, first, again = dup
        raise OptolabError(f"'{field.rsplit('.', 1)[-1]}' is given more than once (first on line {first}); YAML "
                           "would silently keep only the last.", field=field, source=path, line=again,
                           fix="keep one of them.")
    if data is None:
        raise OptolabError(f"the {what} is empty.", source=path, fix="write a mapping of key: value lines.")
    if not isinstance(data, dict):
        raise OptolabError(f"the {what} must be a mapping of key: value lines, not a {type(data).__name__}.",
                           source=path, fix="start with keys such as 'name:' and 'task:'.")
    return data, yaml_line_map(text)


def _resolve_task(raw: Any, base: Path, source: str, protocol_lines: dict, field: str = "task") -> Any:
    """Inline a task given as a path or as ``{spec: path, overrides…}`` (``field``: where it is written)."""
    if isinstance(raw, str):
        raw = {"spec": raw}
    if not isinstance(raw, dict) or "spec" not in raw:
        return raw
    ref = raw["spec"]
    if not isinstance(ref, str):
        raise OptolabError("must be a path to a task YAML file.", field=f"{field}.spec", source=source,
                           fix="write e.g. spec: ../tasks/fewshot_singh2024.yaml")
    path = (base / ref) if not Path(ref).is_absolute() else Path(ref)
    if not path.is_file():
        raise OptolabError(f"task file '{ref}' not found (looked for {_absolute(path)}).", field=field,
                           source=source, fix="give a path relative to the protocol file, e.g. ../tasks/repeat_tokens.yaml")
    spec, lines = read_yaml(path, "task spec")
    overrides = {k: v for k, v in raw.items() if k != "spec"}
    merged = {**spec, **overrides}
    try:
        validate_task_spec(merged, field=field)
    except OptolabError as e:
        key = (e.field or "")[len(field) + 1:].split(".")[0] if (e.field or "").startswith(field + ".") else None
        if key in overrides:  # the protocol's override is what is wrong
            raise e.located(source, protocol_lines) from None
        validate_task_spec(merged, field="", source=str(path), lines=lines)
        raise e.located(str(path), lines) from None
    return merged


def _resolve_clamp_paths(clamps: Any, base: Path) -> Any:
    """Make the files clamps read (graft/freeze ``source``, ``file``) absolute, so the resolved
    protocol a run records points at the same files from anywhere."""
    if clamps is None:
        return []
    if not isinstance(clamps, list):
        return clamps  # the schema reports it
    out = []
    for c in clamps:
        if isinstance(c, dict):
            c = dict(c)
            for key in ("source", "file"):
                if isinstance(c.get(key), str) and not Path(c[key]).expanduser().is_absolute():
                    c[key] = str(_absolute(base / c[key]))
        out.append(c)
    return out


def name_from_file(path: str | Path) -> str:
    """A protocol's default name: its file's, made a valid name (``my protocol é v2.yaml`` ->
    ``my_protocol_e_v2``): accents dropped, every run of other characters one ``_``."""
    import unicodedata

    ascii_stem = unicodedata.normalize("NFKD", Path(path).stem).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", ascii_stem).strip("_") or "protocol"


def read_spec(path: str | Path, what: str, model):
    """A YAML file of ``what`` (sweep, discover, toy protocol) as ``model``: read within bounds
    (:func:`read_yaml`), named after its file unless it says (:func:`name_from_file`), and its
    validation errors translated to one line naming the file and field."""
    from pydantic import ValidationError

    data, lines = read_yaml(path, what)
    data = {"name": name_from_file(path), **data}
    try:
        return model.model_validate(data), lines
    except ValidationError as e:
        raise from_validation_error(e, source=str(path), lines=lines, model=model) from None


def load_protocol(path: str | Path, *, seed: int | None = None, name: str | None = None,
                  device: str | None = None) -> Protocol:
    """Load and validate a protocol file. ``seed`` sets both the init and the data seed;
    ``device`` (``--device``) sets ``train.device``."""
    data, lines = read_yaml(path, "protocol")
    source = str(path)
    data = dict(data)
    data.setdefault("name", name_from_file(path))
    if name is not None:
        data["name"] = name
    if data.get("kind") == "toy_tensor":
        raise OptolabError("this is a toy-model protocol (kind: toy_tensor), not a transformer protocol.",
                           source=source, fix="use `optolab run` or `optolab validate` on it.")
    if "task" not in data:
        raise OptolabError("missing.", field="task", source=source,
                           fix="add 'task: ../tasks/fewshot_singh2024.yaml' (a path or a mapping with 'kind').")
    data["task"] = _resolve_task(data["task"], Path(path).parent, source, lines)
    if "data" in data:  # a data schedule's tasks, resolved like `task` (optolab.protocol.data_schedule)
        data["data"] = resolve_data_paths(
            data["data"], lambda raw, field: _resolve_task(raw, Path(path).parent, source, lines, field))
    data["clamps"] = _resolve_clamp_paths(data.get("clamps"), Path(path).parent)
    init = data.get("init_from")
    if isinstance(init, dict) and isinstance(init.get("run"), str) and not Path(init["run"]).expanduser().is_absolute():
        data["init_from"] = {**init, "run": str(_absolute(Path(path).parent / init["run"]))}
    if isinstance(data.get("conditions"), dict):
        data["conditions"] = {k: _resolve_clamp_paths(v, Path(path).parent) for k, v in data["conditions"].items()}
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise OptolabError(f"seed must be an integer from 0 to {MAX_SEED} (got {seed!r}).", field="--seed",
                               fix="pass e.g. --seed 3.")
        seeds = data.get("seeds") or {}
        if isinstance(seeds, dict):  # anything else is reported by the schema below
            data["seeds"] = {**seeds, "init": seed, "data": seed}
    if device is not None and isinstance(data.get("train"), dict):
        data["train"] = {**data["train"], "device": device}
    return validate_protocol(data, source=source, lines=lines)


def validate_protocol(data: dict, *, source: str | None = None, lines: dict | None = None) -> Protocol:
    try:
        if isinstance(data.get("task"), dict):  # validated apart so errors name task.<field>
            data = {**data, "task": validate_task_spec(data["task"], source=source, lines=lines)}
        protocol = Protocol.model_validate(data)
        check_footprint(protocol, None)  # before the task allocates anything
        task = make_task(protocol.task)
        cfg = protocol.model_config_for(task)  # shape checks that need the task
        check_data(protocol, task)  # the data schedule's tasks fit the model (and mix)
        evaluated = eval_splits(protocol.measures, task)  # measures.splits: the task's, the main one among them
        stop = protocol.train.stop
        if stop is not None and stop.split is not None and stop.split not in evaluated:
            raise OptolabError(f"train.stop.split '{stop.split}' is not evaluated, so the run would never stop.",
                               field="train.stop.split", fix=f"choose from {', '.join(evaluated)}.")
        check_footprint(protocol, cfg.n_ctx)
        protocol.eval_steps()
        protocol.checkpoint_steps()
        if protocol.clamps:
            protocol.clamp_plan(task, cfg)  # kept on the protocol: a run plans once
        if protocol.conditions:
            for name, p in condition_protocols(protocol).items():
                plan_condition(p, name, len(protocol.clamps), task, cfg)
    except ValidationError as e:
        raise from_validation_error(e, source=source, lines=lines, model=Protocol) from None
    except OptolabError as e:
        raise e.located(source, lines) from None
    if source is not None:
        protocol._origin = Origin(source, lines)  # for what only a run can check (init_from's checkpoint)
    return protocol


def protocol_from_resolved(path: str | Path) -> Protocol:
    """Load the ``protocol.yaml`` a run wrote (already resolved)."""
    data, lines = read_yaml(path, "protocol")
    return validate_protocol(data, source=str(path), lines=lines)
