"""Designs: a sweep file's optional ``design:`` section, expanded into ordinary conditions.

Rules:
- A design becomes conditions *before* the sweep's conditions × grid × seeds expansion
  (:func:`optolab.experiments.sweep.apply_design`), after any ``conditions`` the file lists itself.
  Each design condition is the design's base protocol (``design.protocol``, default the sweep's
  ``protocol``) with the design's clamps appended to the base's own, so run ids, validation,
  packing into ensembles and reports see nothing but conditions.
- The model's shape (``model.n_layers``, ``model.n_heads``) and the training budget (steps,
  batch size) are read from that base protocol with the sweep's top-level ``set`` applied.
- ``kind: screen``: every target × every intervention. Targets are one of ``heads: {layers,
  heads}`` (``all`` by default: every head of every layer), ``sites: [...]`` or ``params:
  [...]``. An intervention is a template clamp; ``{layer}``, ``{head}``, ``{other_heads}`` (the
  layer's other heads), ``{site}`` or ``{param}`` inside its strings are filled per target. A
  string that is only a placeholder takes the target's value itself (``layer: "{layer}"`` is
  the number 1; ``heads: "{head}"`` and ``heads: ["{head}"]`` are ``[3]``). Conditions are
  named ``<intervention>_L<layer>H<head>`` (or ``<intervention>_<site or param>``).
- ``kind: window_scan``: the design's clamp (or list of clamps) in a window that slides: every
  ``starts`` × ``lengths`` in ``unit: steps|sequences`` (default sequences), or with
  ``relative_to: budget`` as fractions of the base run's budget (steps). Conditions are named
  ``win_s<start>_l<length>`` (``2e4`` for 20000). A window that runs past the end of training is
  clipped to end there and named by what it covers; two windows that clip to the same one give
  one condition. A window that covers no training step is refused. (Windows relative to the
  reference's detected plateau are not implemented.) A window's clamp acts on **training steps
  only** (``apply_at: train``) unless the design's clamp sets ``apply_at`` itself: an eval inside
  the window then reads the model the clamped training made, not the clamp's output, so a time
  or a final value is never the clamp's direct effect on the readout (a window that covers the
  reference's crossing would otherwise "delay" it by measurement alone). The report says which
  model each condition's evals read (:func:`optolab.experiments.report.readout_lines`).
- ``kind: dose``: the design's clamp (or list) with ``field`` (a field of the clamp, dotted for
  a nested one) set to each of ``values``; conditions ``dose_<value>``.
- Every design may add ``reference: NAME``: a condition NAME with no extra clamps (the sweep's
  ``reference`` defaults to it). ``prefix`` renames the ``win``/``dose`` part of names.
- A design clamp without a ``name`` is named after its condition. Every error is one
  :class:`OptolabError` naming the sweep file and the design field (``design.interventions.ablate.site``),
  raised before anything is written; so are errors found when a design condition's protocol is
  validated (:meth:`DesignCondition.field_for` maps ``clamps.<i>.<field>`` back to the design).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from optolab.core.errors import OptolabError, SpecError, from_validation_error
from optolab.core.strict import EXPONENT_FORM, StrictModel

NAME = r"^[A-Za-z0-9_.+-]+$"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Name = Annotated[str, Field(pattern=NAME)]
Template = dict[str, Any]


def _number(v: Any) -> Any:
    # YAML 1.1 reads 1e5 as text and yes/no as booleans: take the first, refuse the second
    if isinstance(v, bool):
        raise SpecError("", f"a YAML boolean ({str(v).lower()}) is not a number.", "write a number, e.g. 1.0e5.")
    if isinstance(v, str) and EXPONENT_FORM.fullmatch(v.strip()):
        return float(v.strip().replace("_", ""))
    return v


Number = Annotated[float, BeforeValidator(_number)]


def _unique(values: list, what: str) -> list:
    dup = sorted({repr(v) for v in values if values.count(v) > 1})
    if dup:
        raise SpecError("", f"{what} {', '.join(dup)} appear(s) more than once.", "list each once.")
    return values


def _not_empty(values: list) -> list:
    if not values:
        raise SpecError("", "an empty list gives no conditions.", "list at least one value.")
    return values


@dataclass(frozen=True)
class Shape:
    """What a design needs from its base protocol."""

    n_layers: int
    n_heads: int
    total_steps: int
    batch_size: int


@dataclass(frozen=True)
class DesignCondition:
    """One condition a design makes: its name, the clamps it appends to the base protocol's,
    and for each clamp the design field it came from (to name that field in errors)."""

    name: str
    clamps: list[dict]
    origins: list[str] = field(default_factory=list)  # per clamp: e.g. design.interventions.ablate
    aliases: dict[str, str] = field(default_factory=dict)  # clamp field -> the design field that set it
    unknown: dict[str, str] = field(default_factory=dict)  # the same, where the clamp's kind has no such field

    def field_for(self, k: int, rest: str, unknown_key: bool = False) -> str:
        """The design field behind ``<clamp k>.<rest>`` (a field of the appended clamp ``k``);
        ``unknown_key``: the protocol said the clamp's kind has no such field."""
        parts = rest.split(".") if rest else []
        for table in ((self.unknown, self.aliases) if unknown_key else (self.aliases,)):
            for n in range(len(parts), 0, -1):  # the longest aliased prefix wins (window.stop before window)
                alias = table.get(".".join(parts[:n]))
                if alias:
                    return alias
        return ".".join([self.origins[k], *parts])


def error(message: str, where: str, fix: str, source: str | None, lines: dict | None) -> OptolabError:
    return OptolabError(message, field=where, fix=fix).located(source, lines)


def _clamp_list(value: Any) -> list[Template]:
    """``clamp:`` may be one mapping or a list of them (every clamp gets the design's variable)."""
    return value if isinstance(value, list) else [value]


def _some_clamp(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise SpecError("", "an empty list of clamps: every condition would be the base protocol.",
                        "give one clamp (a mapping with a kind) or a list of them.")
    return value


class _Design(StrictModel):
    KIND: ClassVar[str]
    kind: str
    reference: Name | None = Field(None, description="adds a condition of this name with no extra clamps")
    protocol: str | None = Field(None, description="the base protocol, relative to the sweep file "
                                                   "(default: the sweep's protocol)")

    def count(self, shape: Shape) -> int:
        """How many conditions at most (before building them: a design over --max-runs is refused early)."""
        raise NotImplementedError

    def made(self, shape: Shape, source: str | None, lines: dict | None) -> list[DesignCondition]:
        raise NotImplementedError

    def conditions(self, shape: Shape, source: str | None, lines: dict | None) -> list[DesignCondition]:
        out = ([DesignCondition(self.reference, [])] if self.reference else []) + self.made(shape, source, lines)
        seen: set[str] = set()
        for c in out:
            if c.name in seen:
                raise error(f"two of the design's conditions are named '{c.name}'.", "design",
                            "rename the reference, an intervention or the prefix so names differ.", source, lines)
            seen.add(c.name)
        return out


class _ClampDesign(_Design):
    """A design that varies its own clamp (or list of clamps): window scans and doses."""

    clamp: Template | list[Template]

    @field_validator("clamp")
    @classmethod
    def _has_clamp(cls, v: Any) -> Any:
        return _some_clamp(v)


def _named(clamp: Template, name: str) -> Template:
    return clamp if "name" in clamp else {**clamp, "name": name}


# --- screen ------------------------------------------------------------------------------


class HeadTargets(StrictModel):
    layers: list[Annotated[int, Field(ge=0)]] | Literal["all"] = "all"
    heads: list[Annotated[int, Field(ge=0)]] | Literal["all"] = "all"

    @field_validator("layers", "heads")
    @classmethod
    def _once(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise SpecError("", "an empty list selects nothing.", "omit the field (all), or list at least one.")
            _unique(v, "entries")
        return v


class Targets(StrictModel):
    heads: HeadTargets | None = None
    sites: list[str] | None = Field(None, min_length=1)
    params: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Targets:
        given = [k for k in ("heads", "sites", "params") if getattr(self, k) is not None]
        if len(given) != 1:
            which = "both " + " and ".join(given) if given else "none"
            raise SpecError("", f"give exactly one kind of target ({which} given).", "use one of heads: {layers: [1]}, sites: [...] or params: [...]; split the "
                            "sweep for another kind.")
        for k in ("sites", "params"):
            if getattr(self, k) is not None:
                _unique(getattr(self, k), k)
        return self


class Screen(_Design):
    """Every target × every intervention (a template clamp filled per target)."""

    KIND: ClassVar[str] = "screen"
    kind: Literal["screen"]
    targets: Targets
    interventions: dict[Name, Template]

    @field_validator("interventions")
    @classmethod
    def _some(cls, v: dict) -> dict:
        if not v:
            raise SpecError("", "no interventions: the screen would make no conditions.",
                            "give at least one, e.g. ablate: {kind: ablate, site: v{layer}, heads: [\"{head}\"]}.")
        return v

    def _axes(self, shape: Shape, source, lines) -> tuple[list[int], list[int]]:
        t = self.targets.heads
        axes = []
        for what, given, n in (("layers", t.layers, shape.n_layers), ("heads", t.heads, shape.n_heads)):
            if given == "all":
                axes.append(list(range(n)))
                continue
            bad = [x for x in given if x >= n]
            if bad:
                raise error(f"{what[:-1]} {bad[0]} is out of range: the base protocol's model has {n} {what} "
                            f"(0..{n - 1}).", f"design.targets.heads.{what}", f"use indices 0..{n - 1}, or all.",
                            source, lines)
            axes.append(list(given))
        return axes[0], axes[1]

    def _targets(self, shape: Shape, source, lines) -> list[tuple[str, dict[str, Any]]]:
        """``(label, placeholder values)`` per target."""
        if self.targets.heads is not None:
            layers, heads = self._axes(shape, source, lines)
            return [(f"L{layer}H{head}", {"layer": layer, "head": head,
                                          "other_heads": [h for h in range(shape.n_heads) if h != head]})
                    for layer in layers for head in heads]
        key = "sites" if self.targets.sites is not None else "params"
        return [(_slug(x), {key[:-1]: x}) for x in getattr(self.targets, key)]

    def count(self, shape: Shape) -> int:
        t = self.targets
        if t.heads is not None:
            n = ((shape.n_layers if t.heads.layers == "all" else len(t.heads.layers))
                 * (shape.n_heads if t.heads.heads == "all" else len(t.heads.heads)))
        else:
            n = len(t.sites or t.params or [])
        return n * len(self.interventions) + bool(self.reference)

    def made(self, shape: Shape, source, lines) -> list[DesignCondition]:
        if self.targets.heads is not None:
            fills, needs = ("layer", "head", "other_heads"), ("head", "other_heads")
        else:
            fills = needs = ("site",) if self.targets.sites is not None else ("param",)
        for name, template in self.interventions.items():
            where = f"design.interventions.{name}"
            used = set()
            for ph, path in _placeholders(template, where):
                if ph not in fills:
                    close = difflib.get_close_matches(ph, fills, n=1)
                    hint = f"did you mean {{{close[0]}}}? " if close else ""
                    raise error(f"unknown placeholder {{{ph}}}: this screen's targets fill "
                                f"{', '.join('{' + f + '}' for f in fills)}.", path,
                                f"{hint}Use one of those, or write the value itself.", source, lines)
                used.add(ph)
            if not used & set(needs):
                raise error(f"the intervention uses none of {', '.join('{' + f + '}' for f in needs)}, so every "
                            "target would get the same clamp.", where,
                            f"put {{{needs[0]}}} where the target goes, e.g. heads: [\"{{head}}\"] or "
                            "site: \"blocks.{layer}.attn.hook_v\".", source, lines)
        targets = self._targets(shape, source, lines)
        return [DesignCondition(f"{name}_{label}", [_named(_fill(template, values), f"{name}_{label}")],
                                [f"design.interventions.{name}"])
                for name, template in self.interventions.items() for label, values in targets]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "", text.replace("/", "-")) or "x"


def _placeholders(value: Any, path: str) -> list[tuple[str, str]]:
    """Every ``{name}`` in the template's strings, with the design field it sits in."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _placeholders(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _placeholders(v, f"{path}.{i}")]
    if isinstance(value, str):
        return [(m.group(1), path) for m in PLACEHOLDER.finditer(value)]
    return []


def _fill(value: Any, values: dict[str, Any], key: str | None = None) -> Any:
    """The template with its placeholders filled. A string that is only a placeholder becomes
    the value itself (a number stays a number, so ``layer: "{layer}"`` validates as an int)."""
    if isinstance(value, dict):
        return {k: _fill(v, values, k) for k, v in value.items()}
    if isinstance(value, list):
        out: list = []
        for v in value:
            filled = _fill(v, values)
            # ["{other_heads}"] is the list itself, not a list inside the list
            out.extend(filled if isinstance(v, str) and PLACEHOLDER.fullmatch(v) and isinstance(filled, list)
                       else [filled])
        return out
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value)
        if whole:
            filled = values[whole.group(1)]
            return [filled] if key == "heads" and isinstance(filled, int) else filled
        return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), value)
    return value


# --- window_scan -------------------------------------------------------------------------


class WindowScan(_ClampDesign):
    """The design's clamp(s) in a sliding window: starts × lengths."""

    KIND: ClassVar[str] = "window_scan"
    kind: Literal["window_scan"]
    starts: list[Annotated[Number, Field(ge=0)]]
    lengths: list[Annotated[Number, Field(gt=0)]]
    unit: Literal["steps", "sequences"] | None = Field(None, description="default: sequences")
    relative_to: Literal["budget"] | None = Field(
        None, description="starts and lengths are fractions of the base run's budget")
    prefix: Name = "win"

    @field_validator("starts", "lengths")
    @classmethod
    def _some(cls, v: list) -> list:
        return _not_empty(v)

    @model_validator(mode="after")
    def _consistent(self) -> WindowScan:
        _unique(self.starts, "starts")
        _unique(self.lengths, "lengths")
        if self.relative_to is not None:
            if self.unit is not None:
                raise SpecError("unit", "with relative_to: budget, starts and lengths are fractions of the budget, "
                                "so a unit means nothing.", "remove unit, or remove relative_to.")
            for name, values, ok in (("starts", self.starts, lambda x: x < 1), ("lengths", self.lengths,
                                                                                  lambda x: x <= 1)):
                bad = [x for x in values if not ok(x)]
                if bad:
                    raise SpecError(name, f"{bad[0]:g} is not a fraction of the budget ({name} must be "
                                    f"{'below 1' if name == 'starts' else 'at most 1'}).",
                                    "use fractions, e.g. starts: [0, 0.25, 0.5], or drop relative_to and give "
                                    "a unit.")
        else:
            for name in ("starts", "lengths"):
                bad = [x for x in getattr(self, name) if not float(x).is_integer()]
                if bad:
                    raise SpecError(name, f"{bad[0]:g} is not a whole number of {self.unit or 'sequences'}.",
                                    "use whole numbers (1e5 is fine), or relative_to: budget for fractions.")
        for k, c in enumerate(_clamp_list(self.clamp)):
            if isinstance(c, dict) and "window" in c:
                where = "clamp.window" if isinstance(self.clamp, dict) else f"clamp.{k}.window"
                raise SpecError(where, "the design sets each condition's window.",
                                "remove window from the clamp; give starts and lengths instead.")
        return self

    def count(self, shape: Shape) -> int:
        return len(self.starts) * len(self.lengths) + bool(self.reference)

    def _windows(self, shape: Shape, source, lines) -> list[tuple[str, dict]]:
        out: dict[tuple[int, int], tuple[str, dict]] = {}
        total = shape.total_steps
        for s in self.starts:
            for length in self.lengths:
                if self.relative_to is not None:
                    start, stop, per = round(s * total), min(total, round((s + length) * total)), 1
                    label = f"s{_g(s)}_l{_g(min(length, 1 - s))}"
                    unit, shown, end = "steps", f"fraction {_g(s)}", total
                else:
                    unit = self.unit or "sequences"
                    per = shape.batch_size if unit == "sequences" else 1
                    end = total * per
                    start, stop = int(s), min(int(s + length), total * per)
                    label = f"s{_compact(start)}_l{_compact(stop - start)}"
                    shown = f"{start:,} {unit}"
                if start >= end:
                    raise error(f"a window starting at {shown} starts at or past the end of training ({total:,} "
                                f"steps, {total * shape.batch_size:,} sequences).", "design.starts",
                                "drop that start, or train longer.", source, lines)
                if math.ceil(stop / per) <= math.ceil(start / per):
                    raise error(f"the window [{start:,}, {stop:,}) {unit} covers no training step (a step s acts "
                                f"when start <= s·{per} < stop).", "design.lengths",
                                f"use lengths of at least {per} {unit}.", source, lines)
                window = {"start": start, "stop": stop, "unit": unit}
                out.setdefault((math.ceil(start / per), math.ceil(stop / per)), (label, window))
        return list(out.values())

    def made(self, shape: Shape, source, lines) -> list[DesignCondition]:
        clamps = _clamp_list(self.clamp)
        origins = ["design.clamp" if isinstance(self.clamp, dict) else f"design.clamp.{k}" for k in range(len(clamps))]
        aliases = {"window": "design.lengths", "window.start": "design.starts", "window.stop": "design.lengths"}
        out = []
        for label, window in self._windows(shape, source, lines):
            name = f"{self.prefix}_{label}"
            # apply_at: train unless the clamp says otherwise, so evals inside the window read
            # the model training made, not the clamp's output (module rules)
            made = [_named({"apply_at": "train", **c, "window": dict(window)},
                           name if len(clamps) == 1 else f"{name}.{k}") for k, c in enumerate(clamps)]
            out.append(DesignCondition(name, made, origins, aliases))
        return out


def _compact(n: int) -> str:
    """20000 -> 2e4, 150000 -> 1.5e5, 12345 -> 12345 (for names: shortest exact form)."""
    plain = str(n)
    digits = plain.rstrip("0")
    if n < 1000 or not digits:
        return plain
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    sci = f"{mantissa}e{len(plain) - 1}"
    return sci if len(sci) <= len(plain) else plain


def _g(x: float) -> str:
    return f"{round(x, 6):g}"


# --- dose --------------------------------------------------------------------------------


class Dose(_ClampDesign):
    """The design's clamp(s) with one field set to each value."""

    KIND: ClassVar[str] = "dose"
    kind: Literal["dose"]
    field: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
                       description="a field of the clamp, e.g. strength (dotted for a nested one)")
    values: list[Any]
    prefix: Name = "dose"

    @field_validator("values")
    @classmethod
    def _some(cls, v: list) -> list:
        return _not_empty(v)

    @model_validator(mode="after")
    def _consistent(self) -> Dose:
        for k, v in enumerate(self.values):
            if isinstance(v, (dict, list)) or v is None:
                raise SpecError(f"values.{k}", f"{v!r} is not a single value.", "use numbers or words, "
                                "e.g. values: [0, 0.5, 1.0].")
        _unique(self.values, "values")
        for k, c in enumerate(_clamp_list(self.clamp)):
            if isinstance(c, dict) and _get(c, self.field) is not None:
                where = "clamp" if isinstance(self.clamp, dict) else f"clamp.{k}"
                raise SpecError(f"{where}.{self.field}", f"the design sets '{self.field}' per condition, but the "
                                "clamp gives it too.", f"remove {self.field} from the clamp.")
        return self

    def count(self, shape: Shape) -> int:
        return len(self.values) + bool(self.reference)

    def made(self, shape: Shape, source, lines) -> list[DesignCondition]:
        clamps = _clamp_list(self.clamp)
        origins = ["design.clamp" if isinstance(self.clamp, dict) else f"design.clamp.{k}" for k in range(len(clamps))]
        out, names = [], {}
        for k, value in enumerate(self.values):
            name = f"{self.prefix}_{_slug(str(value))[:24]}"
            if name in names:
                raise error(f"values {self.values[names[name]]!r} and {value!r} both give the condition name "
                            f"'{name}'.", f"design.values.{k}", "make the values differ in their letters and "
                            "digits.", source, lines)
            names[name] = k
            made = [_named(_put(c, self.field, value), name if len(clamps) == 1 else f"{name}.{j}")
                    for j, c in enumerate(clamps)]
            out.append(DesignCondition(name, made, origins, {self.field: f"design.values.{k}"},
                                       {self.field: "design.field"}))
        return out


def _get(data: dict, dotted: str) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _put(data: dict, dotted: str, value: Any) -> dict:
    """A copy of ``data`` with ``a.b`` set (mappings made where missing)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return {**data, head: value}
    inner = data.get(head)
    return {**data, head: _put(inner if isinstance(inner, dict) else {}, rest, value)}


# --- parsing -----------------------------------------------------------------------------

KINDS: dict[str, type[_Design]] = {cls.KIND: cls for cls in (Screen, WindowScan, Dose)}


def parse(raw: Any, source: str | None, lines: dict | None) -> _Design:
    """The sweep file's ``design:`` mapping as its kind's model (errors name ``design.<field>``)."""
    if not isinstance(raw, dict):
        raise error("a design is a mapping with a kind.", "design",
                    f"write e.g. design: {{kind: screen, …}}; kinds: {', '.join(KINDS)}.", source, lines)
    kind = raw.get("kind")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        what = f"unknown design kind '{kind}'." if kind is not None else "the design has no kind."
        raise error(what, "design.kind", f"{hint}Use one of {', '.join(KINDS)}.", source, lines)
    cls = KINDS[kind]
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise from_validation_error(_TyposFirst(e), source=source, prefix="design", lines=lines, model=cls) from None


class _TyposFirst:
    """A validation error whose unknown keys come first: ``start:`` for ``starts:`` is better
    reported as the typo (with "did you mean") than as ``starts`` missing."""

    def __init__(self, e: ValidationError) -> None:
        self.e = e

    def errors(self, **kw: Any) -> list:
        return sorted(self.e.errors(**kw), key=lambda err: err.get("type") != "extra_forbidden")
