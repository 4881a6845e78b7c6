"""Compile a protocol's ``clamps:`` into a checked, ordered plan, before any training.

Rules:
- Everything a user can get wrong is found here and raised as one
  :class:`~optolab.errors.OptolabError` naming ``clamps.<i>.<field>``: an unknown site (with the
  nearest valid names), a head or position out of range, a window outside the training budget,
  ``perfect_match`` on a task without labels, two clamps writing the same entries at the same
  time, a graft or freeze source that does not exist or does not fit the model.
- Sites are checked by a dry forward pass of a freshly built model on a two-sequence batch:
  a site that does not fire is rejected, and shapes come from what actually ran.
- Windows become step ranges ``[start, stop)``; sequences convert as ``ceil(seq / batch)``.
  An evaluation at step ``s`` (the model after ``s`` updates) uses the clamps whose window
  holds ``s``; a window that runs to the end of training also covers the final evaluation.
- ``preserve`` is the weakest clamp: it may overlap any other, which then wins on the shared
  entries. ``perfect_copy`` and ``layer_clamp(copy_head)`` both define the output: at most one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from optolab.clamps.sites import SiteInfo, canonical, resolve_positions, site_info, suggest
from optolab.clamps.spec import Freeze, Graft, LayerClamp, PerfectCopy, Scale, SetTo
from optolab.errors import OptolabError
from optolab.model import Transformer, build_model
from optolab.tasks.base import Batch, Task

WRITE_KINDS = ("ablate", "set", "graft", "stop_gradient", "scale", "add")


@dataclass(frozen=True)
class When:
    """Steps ``[start, stop)`` and the phases (training steps, evaluations) a clamp acts in."""

    start: int
    stop: int
    train: bool
    eval: bool

    def active(self, step: int, training: bool, total: int) -> bool:
        if training:
            return self.train and self.start <= step < self.stop
        return self.eval and (self.start <= step < self.stop or (step == total and self.stop == total))

    def overlaps(self, other: When) -> bool:
        return (self.start < other.stop and other.start < self.stop
                and ((self.train and other.train) or (self.eval and other.eval)))


@dataclass
class Compiled:
    """One compiled clamp. Site clamps carry ``site``/``heads``/``positions``; the others
    (perfect_copy, layer_clamp, freeze) only their spec and timing."""

    index: int
    spec: object
    when: When
    site: SiteInfo | None = None
    heads: tuple[int, ...] | None = None
    positions: object = "all"  # as written; resolved per sequence length at run time
    tensor: Tensor | None = None  # set to: file / freeze source values
    values: dict[str, Tensor] | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass
class Plan:
    """Everything the engine needs: compiled clamps in protocol order and the site order."""

    site_order: dict[str, int]
    total_steps: int
    batch_size: int
    exemplar_label: bool
    site_clamps: list[Compiled] = field(default_factory=list)
    copy: Compiled | None = None
    layer_clamps: list[Compiled] = field(default_factory=list)
    freezes: list[Compiled] = field(default_factory=list)
    grafts: dict[int, Transformer] = field(default_factory=dict)  # clamp index -> frozen model


def _err(i: int, field_: str, message: str, fix: str) -> OptolabError:
    return OptolabError(message, field=f"clamps.{i}.{field_}" if field_ else f"clamps.{i}", fix=fix)


def _window(i: int, spec, bs: int, total: int) -> tuple[int, int]:
    w = spec.window
    per = bs if w.unit == "sequences" else 1
    end = total * per
    if w.start >= end:
        raise _err(i, "window.start", f"starts at {w.start:,} {w.unit}, at or past the end of training "
                   f"({end:,} {w.unit}).", f"use a start below {end:,}, or train longer.")
    if w.stop is not None and w.stop > end:
        raise _err(i, "window.stop", f"stops at {w.stop:,} {w.unit}, past the end of training ({end:,} {w.unit}).",
                   f"use a stop <= {end:,}, or omit it to clamp until the end.")
    start = math.ceil(w.start / per)
    stop = total if w.stop is None else math.ceil(w.stop / per)
    return start, stop


def _heads(i: int, heads, n_heads: int, field_: str = "heads") -> tuple[int, ...] | None:
    if heads == "all":
        return None
    for h in heads:
        if not 0 <= h < n_heads:
            raise _err(i, field_, f"head {h} is out of range: the model has {n_heads} heads per layer.",
                       f"use head indices 0..{n_heads - 1}.")
    return tuple(sorted(set(heads)))


def dry_run(model: Transformer, batch: Batch) -> dict[str, tuple[int, ...]]:
    """Shapes of every hook site that fires, in firing order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(name: str):
        def hook(_m, _i, out) -> None:  # returns None: a forward hook's return value replaces the output
            shapes.setdefault(name, tuple(out.shape))
        return hook

    handles = [m.register_forward_hook(grab(name)) for name, m in model.hook_points().items()]
    try:
        with torch.no_grad():
            model(*batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def compile_clamps(protocol, task: Task, cfg, base_dir: Path | None = None) -> Plan:
    """Check every clamp against the model and task and return the plan (raises OptolabError)."""
    from optolab.clamps.sources import load_frozen_model, load_param_values

    bs, total = protocol.train.batch_size, protocol.train.total_steps
    model = build_model(cfg, 0)
    batch = task.train_batch(0, 0, 2)
    shapes = dry_run(model, batch)
    valid = list(shapes)
    plan = Plan(site_order={n: k for k, n in enumerate(valid)}, total_steps=total, batch_size=bs,
                exemplar_label=cfg.input_mode == "exemplar_label")
    H, L = cfg.n_heads, cfg.n_layers
    outputs = []  # clamps that define the logits
    for i, spec in enumerate(protocol.clamps):
        start, stop = _window(i, spec, bs, total)
        when = When(start, stop, spec.apply_at in ("train", "both"), spec.apply_at in ("eval", "both"))
        if isinstance(spec, PerfectCopy):
            _layer(i, spec.layer, L)
            _heads(i, [spec.head], H, "head")
            if batch.context_labels is None:
                raise _err(i, "kind", "perfect_copy turns attention to label tokens into label logits, but this "
                           f"task ({protocol.task.kind}) has no label tokens.", "use it with a fewshot task.")
            outputs.append(i)
            plan.copy = Compiled(i, spec, when)
            continue
        if isinstance(spec, LayerClamp):
            if spec.layer + 1 >= L:
                raise _err(i, "layer", f"layer_clamp replaces the output of layer {spec.layer} and forces the "
                           f"patterns of the next layer, but the model has {L} layers.",
                           f"use a layer below {L - 1}.")
            if spec.copy_head is not None:
                _heads(i, [spec.copy_head], H, "copy_head")
                outputs.append(i)
            if not plan.exemplar_label:
                raise _err(i, "recipe", "perfect_prev_token_input shifts exemplar embeddings into label slots; "
                           "it needs an exemplar-label task.", "use it with a fewshot task.")
            if plan.layer_clamps:
                raise _err(i, "kind", f"clamp {plan.layer_clamps[0].index} is already a layer_clamp; one recipe "
                           "per protocol.", "keep one layer_clamp.")
            plan.layer_clamps.append(Compiled(i, spec, when))
            continue
        if isinstance(spec, Freeze):
            params = dict(model.named_parameters())
            if spec.param not in params:
                raise _err(i, "param", f"unknown parameter '{spec.param}'.",
                           suggest_param(spec.param, list(params)))
            heads = _heads(i, spec.heads, H)
            if heads is not None and param_head_axis(spec.param) is None:
                raise _err(i, "heads", f"'{spec.param}' has no head axis.", "remove 'heads' to freeze it whole.")
            values = load_param_values(i, spec, model, base_dir) if spec.source else None
            plan.freezes.append(Compiled(i, spec, when, heads=heads, values=values))
            continue
        plan.site_clamps.append(_site_clamp(i, spec, shapes, valid, task, batch, H, when,
                                            plan.exemplar_label, base_dir))
        if isinstance(spec, Graft):
            plan.grafts[i] = load_frozen_model(i, spec, cfg, task, batch, shapes, base_dir)
    if len(outputs) > 1:
        raise _err(outputs[1], "kind", f"clamps {outputs[0]} and {outputs[1]} both define the model's output "
                   "(perfect_copy / layer_clamp copy_head).", "keep only one of them.")
    _check_conflicts(plan, shapes)
    return plan


def _layer(i: int, layer: int, n_layers: int) -> None:
    if layer >= n_layers:
        raise _err(i, "layer", f"layer {layer} is out of range: the model has {n_layers} layers.",
                   f"use 0..{n_layers - 1}.")


def _site_clamp(i, spec, shapes, valid, task, batch, H, when, exemplar_label, base_dir) -> Compiled:
    name = canonical(spec.site)
    if name not in shapes:
        raise _err(i, "site", f"unknown hook site '{spec.site}'.", suggest(spec.site, valid))
    info = site_info(name)
    heads = _heads(i, spec.heads, H)
    if heads is not None and info.head_axis is None:
        raise _err(i, "heads", f"'{name}' has no head axis.",
                   "remove 'heads', or use a per-head site such as blocks.0.attn.hook_z or hook_result.")
    n = shapes[name][info.pos_axis]
    try:
        resolve_positions(spec.positions if isinstance(spec.positions, str) else tuple(spec.positions), n, exemplar_label)
    except ValueError as e:
        raise _err(i, "positions", str(e) + ".", "use all, query, labels, exemplars or indices inside the sequence.") from None
    tensor = None
    if isinstance(spec, SetTo):
        if spec.to in ("previous_token", "perfect_match", "uniform") and not info.is_pattern:
            raise _err(i, "site", f"to: {spec.to} is an attention pattern, but '{name}' is not one.",
                       f"use site blocks.<layer>.attn.hook_pattern (e.g. pattern{info.layer or 0}).")
        if spec.to == "perfect_match":
            if batch.match_mask is None:
                raise _err(i, "to", f"perfect_match needs the query's label among the context labels, but this "
                           f"task ({task.kind}) has no labels.", "use a fewshot task, or set to: previous_token/uniform.")
            if spec.positions not in ("all", "query"):  # "all" is the default: the query row
                raise _err(i, "positions", "perfect_match sets the query row only.", "remove 'positions' or use query.")
        if spec.to == "file":
            from optolab.clamps.sources import load_tensor_file

            tensor = load_tensor_file(i, spec.file, base_dir, shapes[name])
    if isinstance(spec, Scale) and not math.isfinite(spec.factor):
        raise _err(i, "factor", "must be a finite number.", "use e.g. factor: 2.0.")
    positions = "query" if isinstance(spec, SetTo) and spec.to == "perfect_match" else spec.positions
    positions = positions if isinstance(positions, str) else tuple(positions)
    return Compiled(i, spec, when, info, heads, positions, tensor)


def _check_conflicts(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> None:
    writers: list[tuple[int, str, tuple | None, object, When]] = []
    for c in plan.site_clamps:
        if c.kind in WRITE_KINDS:
            writers.append((c.index, c.site.name, c.heads, c.positions, c.when))
    for c in plan.layer_clamps:
        writers.append((c.index, f"blocks.{c.spec.layer}.hook_resid_post", None, "all", c.when))
        writers.append((c.index, f"blocks.{c.spec.layer + 1}.attn.hook_pattern", None, "all", c.when))
    for a in range(len(writers)):
        for b in range(a + 1, len(writers)):
            (ia, site, heads_a, pos_a, when_a), (ib, site_b, heads_b, pos_b, when_b) = writers[a], writers[b]
            if site != site_b or ia == ib:
                continue
            n = shapes[site][site_info(site).pos_axis]
            if (_overlap_sets(heads_a, heads_b) and _overlap_sets(_pos(pos_a, n, plan), _pos(pos_b, n, plan))
                    and when_a.overlaps(when_b)):
                raise _err(ib, "site", f"clamps {ia} and {ib} both write entries of '{site}' at the same "
                           "steps, so one would silently undo the other.",
                           "give them disjoint heads, positions or windows, or remove one.")


def _pos(positions, n: int, plan: Plan) -> tuple[int, ...] | None:
    return resolve_positions(positions, n, plan.exemplar_label)


def _overlap_sets(a, b) -> bool:
    return a is None or b is None or bool(set(a) & set(b))


HEAD_AXES = {"W_Q": 1, "W_K": 1, "W_V": 1, "W_O": 0, "b_Q": 0, "b_K": 0, "b_V": 0, "smear_alpha": 0}


def param_head_axis(name: str) -> int | None:
    return HEAD_AXES.get(name.rsplit(".", 1)[-1]) if ".attn." in name else None


def suggest_param(name: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "? ") if close else ""
    return hint + "Parameters are named like blocks.0.attn.W_V, W_X, W_L, W_U."

