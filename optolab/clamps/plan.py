"""Plan a protocol's ``clamps:``: check every clamp against the model and task, once, before any
training, and order them for the engine.

Rules:
- Everything a user can get wrong is found here and raised as one
  :class:`~optolab.core.errors.OptolabError` naming ``clamps.<i>.<field>``: an unknown site (with
  the nearest valid names), a head or position out of range, a window outside the training
  budget, a kind that does not fit the task, two clamps writing the same entries at the same
  time, a file that does not exist or does not fit the model. Each kind checks its own fields
  (:meth:`~optolab.clamps.kind.ClampSpec.plan`); windows, outputs and conflicts are checked here.
- Sites are checked by a dry forward pass of a freshly built model on a two-sequence batch
  (:func:`~optolab.model.hooks.dry_run`): a site that does not fire is rejected, and shapes
  come from what actually ran.
- Windows become step ranges ``[start, stop)`` (one unit, steps, from here on); sequences
  convert as ``ceil(seq / batch)``. An evaluation at step ``s`` (the model after ``s`` updates)
  uses the clamps whose window holds ``s``; a window that runs to the end of training also
  covers the final evaluation.
- Every forward clamp runs once on the dry run, alone (:func:`probe_draws`), to find whether its
  ops draw random numbers (``Planned.draws``; a kind's ``stochastic`` declaration stands in for
  the probe): a clamp that draws is never shared across an ensemble's conditions
  (:mod:`optolab.clamps.union`). The passes the clamps need have one position each.
- At most one clamp defines the model's output (``perfect_copy``, ``layer_clamp`` with
  ``copy_head``).
- A run plans once: the protocol keeps its plan (:meth:`~optolab.protocol.schema.Protocol.clamp_plan`).
  Planning happens on the CPU; a run on another device takes :meth:`Plan.to_device` (what the
  clamps loaded, moved; the protocol's own plan stays on the CPU).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from optolab.clamps.kind import Parts, PlanContext, Planned, When, pass_positions
from optolab.clamps.rng import call_key
from optolab.clamps.sites import resolve_positions, site_info
from optolab.clamps.values import PassContext, call_inputs
from optolab.core.device import to_device
from optolab.core.errors import OptolabError
from optolab.model.hooks import SiteHooks, dry_run
from optolab.model.transformer import build_model
from optolab.tasks.base import Task


@dataclass
class Plan:
    """Everything the engine needs: planned clamps in protocol order and the site order."""

    site_order: dict[str, int]
    total_steps: int
    batch_size: int
    exemplar_label: bool
    clamps: list[Planned] = field(default_factory=list)

    @property
    def per_head_layers(self) -> frozenset[int]:
        """Layers whose per-head attention results a clamp reads or writes (``hook_result``):
        the compiled and ensemble paths compute per-head results only there."""
        return frozenset(c.site.layer for c in self.clamps
                         if c.site is not None and c.site.name.endswith("attn.hook_result"))

    def to_device(self, device: torch.device) -> Plan:
        """This plan with what its clamps loaded (tensors, parameter values, frozen models) on
        ``device``; itself on the CPU."""
        if device.type == "cpu":
            return self

        def moved(data):
            return copy.deepcopy(data).to(device) if isinstance(data, nn.Module) else to_device(data, device)

        return replace(self, clamps=[replace(c, data=moved(c.data)) for c in self.clamps])

    def posthoc(self) -> Plan:
        """This plan for post-hoc evaluation: every clamp that acts on evaluations acts at every
        one (windows describe training time); parameter clamps are dropped."""
        return replace(self, clamps=[c.always(self.total_steps) for c in self.clamps if c.spec.acts_on_forward])


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
    if stop <= start:
        raise _err(i, "window", f"the window [{w.start:,}, {w.stop:,}) {w.unit} covers no training step: steps run "
                   f"every {per} {w.unit} and a step s acts when start <= s·{per} < stop, so this clamp would "
                   "never act.", f"widen the window to span at least {per} {w.unit}, or use unit: steps.")
    return start, stop


def plan_clamps(protocol, task: Task, cfg) -> Plan:
    """Check every clamp against the model and task and return the plan (raises OptolabError)."""
    bs, total = protocol.train.batch_size, protocol.train.total_steps
    model = build_model(cfg, 0)
    batch = task.train_batch(0, 0, 2)
    shapes = dry_run(model, batch)
    ctx = PlanContext(model, batch, shapes, task, cfg)
    plan = Plan(site_order={n: k for k, n in enumerate(shapes)}, total_steps=total, batch_size=bs,
                exemplar_label=ctx.exemplar_label)
    outputs = []  # clamps that define the logits
    for i, spec in enumerate(protocol.clamps):
        start, stop = _window(i, spec, bs, total)
        when = When(start, stop, spec.apply_at in ("train", "both"), spec.apply_at in ("eval", "both"))
        c = spec.plan(i, ctx, when)
        _check_passes(i, ctx.planned + [c])
        c.draws = probe_draws(c, ctx, plan.site_order)
        if spec.defines_output:
            outputs.append(i)
        ctx.planned.append(c)
    if len(outputs) > 1:
        raise _err(outputs[1], "kind", f"clamps {outputs[0]} and {outputs[1]} both define the model's output "
                   "(perfect_copy / layer_clamp copy_head).", "keep only one of them.")
    plan.clamps = ctx.planned
    _check_conflicts(plan, shapes)
    return plan


def _check_passes(i: int, planned: list[Planned]) -> None:
    try:
        pass_positions(c.spec for c in planned)
    except ValueError as e:
        raise _err(i, "kind", f"{e}.", "give each pass one position (0 < position < 100) in the kind's needs, "
                   "or rename the pass.") from None


def probe_draws(c: Planned, ctx: PlanContext, site_order: dict[str, int]) -> bool:
    """Whether clamp ``c``'s ops draw random numbers (``ctx.normal``): its program alone, run once
    on the dry run's model and batch through site hooks, with a context that records draws. A
    kind's ``stochastic`` declaration, when set, is the answer instead."""
    spec = c.spec
    if spec.stochastic is not None or not spec.acts_on_forward:
        return bool(spec.stochastic)
    parts = Parts.of([c], ctx.exemplar_label)
    pc = PassContext(ctx.batch, prepared={c.index: spec.prepare(c, ctx.batch)}, draws=set(),
                     **call_inputs(call_key(0, 0, c.when.start, True), c.when.start))
    hooks = SiteHooks(ctx.model)
    try:
        for ops in parts.ops.values():
            by_site: dict[str, list] = {}
            for site, _rank, op in sorted(ops, key=lambda t: (site_order[t[0]], t[1])):
                by_site.setdefault(site, []).append(op)
            hooks.cover(by_site)
            with torch.no_grad(), hooks.acting(by_site, pc):
                ctx.model(*ctx.batch.inputs)
    finally:
        hooks.close()
    return bool(pc.draws)


def _check_conflicts(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> None:
    writers = [(c.index, site, heads, pos, c.when) for c in plan.clamps for site, heads, pos in c.spec.writes(c)]
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
