"""The clamp engine: runs a compiled :class:`~optolab.clamps.compile.Plan` on every forward.

Rules:
- One nnsight trace per pass. A step needs one pass, plus one clean pass when a ``preserve``
  clamp is active and one shifted pass when a ``layer_clamp`` is (the authors' three-pass
  layer clamp takes two traces here: the embedding it needs is read at the start of each pass).
- In a trace, sites are visited in forward order; at each site the activation is read once,
  every op for that site runs in protocol order (``preserve`` first, so others win), and the
  result is assigned back to ``.output``. Nothing is written in place: ops build new tensors
  with ``torch.where``. The logits are saved in the trace; the caller takes the loss, the
  backward and the optimizer step after the ``with`` block.
- Which clamps act is decided per call from the step and the phase (training or evaluation);
  the pass program for each distinct set of active clamps is built once and cached.
- ``backend="hooks"`` runs the very same ops through PyTorch forward hooks instead of nnsight
  (a fast path; tests prove it gives bit-identical parameters for every kind). nnsight is the
  default.
- Freezes act around the optimizer step: their gradient slice is zeroed after ``backward`` and
  their values are restored after ``step`` (so Adam's momentum cannot move them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from optolab.clamps.compile import Compiled, Plan, param_head_axis
from optolab.clamps.sites import resolve_positions, selection_mask
from optolab.clamps.values import (PassContext, perfect_match_rows, previous_token_pattern, shift_right,
                                   uniform_pattern)
from optolab.forward import Forward, PlainForward
from optolab.tasks.base import Batch

Op = Callable[[Tensor, PassContext], Tensor]
TRUE = torch.ones((), dtype=torch.bool)


@lru_cache(maxsize=256)
def _positions(positions, n: int, exemplar_label: bool):
    return resolve_positions(positions, n, exemplar_label, strict=False)


@lru_cache(maxsize=64)
def _fixed_pattern(kind: str, n_q: int, n_k: int, strength: float) -> Tensor:
    return previous_token_pattern(n_q, n_k, strength) if kind == "previous_token" else uniform_pattern(n_q, n_k)


def _value_fn(c: Compiled) -> Callable[[Tensor, PassContext], Tensor]:
    """The value a site clamp writes on its selected entries."""
    s, kind = c.spec, c.kind
    if kind == "ablate":
        if s.how == "zero":
            return lambda out, ctx: out.new_zeros(())
        if s.how == "mean":
            return lambda out, ctx: out.detach().mean(0, keepdim=True)
        return lambda out, ctx: out.detach().roll(1, dims=0)
    if kind == "set":
        if s.to in ("previous_token", "uniform"):
            patterns: dict[torch.Size, Tensor] = {}  # per shape; a plain dict the compiler can read

            def fixed(out: Tensor, ctx: PassContext) -> Tensor:
                p = patterns.get(out.shape)
                if p is None:
                    p = patterns[out.shape] = _fixed_pattern(s.to, out.shape[-2], out.shape[-1], s.strength)
                return p
            return fixed
        if s.to == "perfect_match":
            return lambda out, ctx: perfect_match_rows(ctx.batch, s.strength)
        if s.to == "constant":
            return lambda out, ctx: out.new_full((), s.value)
        return lambda out, ctx: c.tensor
    if kind == "preserve":
        return lambda out, ctx: ctx.recorded[("clean", c.site.name)]
    if kind == "graft":
        return lambda out, ctx: ctx.grafted[c.index]
    if kind == "stop_gradient":
        return lambda out, ctx: out.detach()
    if kind == "scale":
        if c.site.is_scores:  # masked keys hold -inf; keep them (and avoid 0 * -inf)
            return lambda out, ctx: torch.where(torch.isfinite(out), out * s.factor, out)
        return lambda out, ctx: out * s.factor
    if kind == "add":
        return lambda out, ctx: out + s.value
    raise AssertionError(kind)


def site_op(c: Compiled, exemplar_label: bool) -> Op:
    value = _value_fn(c)
    info, heads, positions = c.site, c.heads, c.positions

    masks: dict[torch.Size, Tensor] = {}  # per activation shape (lengths can vary per batch)

    def op(out: Tensor, ctx: PassContext) -> Tensor:
        mask = masks.get(out.shape)
        if mask is None:
            pos = _positions(positions, out.shape[info.pos_axis], exemplar_label) if info.pos_axis is not None else None
            mask = selection_mask(tuple(out.shape), info.head_axis, heads, info.pos_axis, pos)
            mask = masks[out.shape] = TRUE if mask is None else mask
        return torch.where(mask, value(out, ctx), out)

    return op


def record(key: tuple[str, str], detach: bool = False) -> Op:
    def op(out: Tensor, ctx: PassContext) -> Tensor:
        ctx.recorded[key] = out.detach() if detach else out
        return out
    return op


def save_op(name: str) -> Op:
    def op(out: Tensor, ctx: PassContext) -> Tensor:
        ctx.saved[name] = out.detach()
        return out
    return op


@dataclass
class Pass:
    name: str
    steps: list[tuple[str, list[Op]]]  # (site, ops) in forward order


@dataclass
class Program:
    passes: list[Pass]
    copy: tuple[str, str, int] | None  # (pass, scores site, head) whose scores become the logits
    grafts: list[Compiled]
    # a union's (optolab.clamps.union): each condition's output, (pass, scores site, head) or
    # (pass, None, None) for that pass's logits; a member takes its condition's (ctx.gate)
    outputs: list[tuple[str, str | None, int | None]] | None = None


RankedOps = list[tuple[str, int, Op]]  # (site, rank, op)


def program_parts(plan: Plan, active: list[Compiled],
                  save: Sequence[str]) -> tuple[list[tuple[str, RankedOps]], tuple[str, str, int] | None]:
    """The passes of the program for ``active`` as ranked op lists, in run order, and its copy
    output. ``rank`` orders the ops at one site: 0 read the input, 1 preserve, 2 clamps, 3 recipe
    writes, 4 records, 5 saves, so every record and save sees the value the model goes on with."""
    site_clamps = [c for c in active if c.site is not None]
    preserves = [c for c in site_clamps if c.kind == "preserve"]
    ordinary = [c for c in site_clamps if c.kind != "preserve"]
    layer = next((c for c in active if c.kind == "layer_clamp"), None)
    copy = next((c for c in active if c.kind == "perfect_copy"), None)
    ex = plan.exemplar_label
    passes: list[tuple[str, RankedOps]] = []
    clamp_ops = [(c.site.name, 2, site_op(c, ex)) for c in ordinary]

    if preserves:
        passes.append(("clean", [(c.site.name, 4, record(("clean", c.site.name))) for c in preserves]))
    output: tuple[str, str, int] | None = None
    if layer is not None:
        L = layer.spec.layer
        embed, resid, nxt = "blocks.0.hook_resid_pre", f"blocks.{L}.hook_resid_post", f"blocks.{L + 1}.attn"
        ops = clamp_ops + [
            (embed, 0, record(("shifted", "embed"))),
            (resid, 3, lambda out, ctx: shift_right(ctx.recorded[("shifted", "embed")])),
            (f"{nxt}.hook_pattern", 4, record(("shifted", f"{nxt}.hook_pattern"))),
        ]
        if layer.spec.copy_head is not None:
            ops.append((f"{nxt}.hook_attn_scores", 4, record(("shifted", f"{nxt}.hook_attn_scores"))))
            output = ("shifted", f"{nxt}.hook_attn_scores", layer.spec.copy_head)
            ops += [(s, 5, save_op(s)) for s in save]
            passes.append(("shifted", ops))
            return passes, output
        passes.append(("shifted", ops))
    main = clamp_ops + [(c.site.name, 1, site_op(c, ex)) for c in preserves]
    if layer is not None:
        main += [
            (embed, 0, record(("main", "embed"))),
            (resid, 3, lambda out, ctx: ctx.recorded[("main", "embed")]),
            (f"{nxt}.hook_pattern", 3, lambda out, ctx, k=("shifted", f"{nxt}.hook_pattern"): ctx.recorded[k]),
        ]
    if copy is not None:
        scores = f"blocks.{copy.spec.layer}.attn.hook_attn_scores"
        main.append((scores, 4, record(("main", scores))))
        output = ("main", scores, copy.spec.head)
    main += [(s, 5, save_op(s)) for s in save]
    passes.append(("main", main))
    return passes, output


def assemble(plan: Plan, name: str, ops: RankedOps) -> Pass:
    """One pass: ``ops`` grouped by site in forward order, by rank within a site (stable, so
    ops of one rank keep their list order: protocol order)."""
    by_site: dict[str, list[Op]] = {}
    for site, _rank, op in sorted(ops, key=lambda t: (plan.site_order[t[0]], t[1])):
        by_site.setdefault(site, []).append(op)
    return Pass(name, list(by_site.items()))


def build_program(plan: Plan, active: list[Compiled], save: Sequence[str]) -> Program:
    parts, output = program_parts(plan, active, save)
    grafts = [c for c in active if c.site is not None and c.kind == "graft"]
    return Program([assemble(plan, name, ops) for name, ops in parts], output, grafts)


def saving(save: Sequence[str]) -> Program:
    """The unclamped program that saves ``save`` (the engine runs such calls without nnsight)."""
    return Program([Pass("main", [(s, [save_op(s)]) for s in save])], None, [])


def program_logits(program: Program, logits: dict[str, Tensor], ctx: PassContext, batch: Batch) -> Tensor:
    """The program's logits from each pass's (``logits``: pass name -> logits): the last pass's,
    or the copy head's where the program defines the output; in a union, each member's
    condition's (selected by ``ctx.gate``, the member's one-hot condition)."""
    if program.outputs is None:
        last = logits[program.passes[-1].name]
        if program.copy is None:
            return last
        pass_name, site, head = program.copy
        return copy_logits(logits[pass_name], ctx.recorded[(pass_name, site)], head, batch)
    chosen: dict[tuple, list[int]] = {}
    for k, out in enumerate(program.outputs):
        chosen.setdefault(out, []).append(k)
    result = None
    for (pass_name, site, head), conditions in chosen.items():
        value = logits[pass_name] if site is None else \
            copy_logits(logits[pass_name], ctx.recorded[(pass_name, site)], head, batch)
        result = value if result is None else torch.where(ctx.gate[conditions].any(), value, result)
    return result


def copy_logits(logits: Tensor, scores: Tensor, head: int, batch: Batch) -> Tensor:
    """Query logits from one head's pre-softmax scores to the label tokens (ANCHORS §2): each
    context label gets the log-sum-exp of its tokens' scores (= the score when it occurs once),
    every other label −1e9."""
    labels = batch.inputs[1]  # [batch, n_lab]
    n_labels = logits.shape[-1]
    label_pos = torch.arange(1, 2 * labels.shape[1], 2)
    row = scores[:, head, -1, label_pos]  # [batch, n_lab]
    onehot = torch.nn.functional.one_hot(labels, n_labels).bool()  # [batch, n_lab, n_labels]
    per_label = torch.logsumexp(row[:, :, None].masked_fill(~onehot, float("-inf")), dim=1)
    query = torch.where(onehot.any(1), per_label, torch.full_like(per_label, -1e9))
    return torch.cat([logits[:, :-1], query[:, None]], dim=1)


class ClampForward(Forward):
    """A :class:`~optolab.forward.Forward` that applies a protocol's clamps."""

    def __init__(self, plan: Plan, backend: str = "nnsight") -> None:
        self.plan = plan
        self.backend = backend
        self._programs: dict[tuple, Program] = {}
        self._envoys: dict[int, tuple[object, dict[str, object]]] = {}
        self._plain = PlainForward()
        self._applied_sources: set[int] = set()
        self._snapshots: list[tuple[nn.Parameter, tuple, Tensor]] = []
        self._acting = sorted(plan.site_clamps + plan.layer_clamps + ([plan.copy] if plan.copy else []),
                              key=lambda c: c.index)

    # --- which clamps act ----------------------------------------------------------------

    def active(self, step: int, training: bool) -> list[Compiled]:
        total = self.plan.total_steps
        return [c for c in self._acting if c.when.active(step, training, total)]

    def __call__(self, model: nn.Module, batch: Batch, *, step: int, training: bool,
                 save: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        program, grafted = self.prepare(model, batch, step, training, save)
        if program is None:
            return self._plain(model, batch, step=step, training=training, save=save)
        ctx = PassContext(batch, grafted=grafted)
        logits = {p.name: self._run(model, p, batch, ctx) for p in program.passes}
        return program_logits(program, logits, ctx, batch), ctx.saved

    def prepare(self, model: nn.Module, batch: Batch, step: int, training: bool,
                save: Sequence[str] = ()) -> tuple[Program | None, dict]:
        """Everything before the passes: freeze sources applied, the program of the clamps active
        at ``step`` (None when none is), and the grafted activations it reads."""
        self._apply_freeze_sources(model, step, training)
        active = self.active(step, training)
        if not active:
            return None, {}
        key = (tuple(c.index for c in active), tuple(save))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = build_program(self.plan, active, save)
        grafted = {}
        for g in program.grafts:
            _, got = self._plain(self.plan.grafts[g.index], batch, step=step, training=False, save=[g.site.name])
            grafted[g.index] = got[g.site.name]
        return program, grafted

    # --- one pass ------------------------------------------------------------------------

    def _run(self, model: nn.Module, p: Pass, batch: Batch, ctx: PassContext) -> Tensor:
        if self.backend == "hooks":
            return self._run_hooks(model, p, batch, ctx)
        nn_model, steps = self._wrap(model, p)
        with nn_model.trace(*batch.inputs):
            for envoy, ops in steps:
                out = envoy.output
                new = out
                for op in ops:
                    new = op(new, ctx)
                if new is not out:
                    envoy.output = new
            logits = nn_model.output.save()
        return logits

    def _run_hooks(self, model: nn.Module, p: Pass, batch: Batch, ctx: PassContext) -> Tensor:
        modules = dict(model.named_modules())

        def hook(ops: list[Op]):
            def fn(_m, _inp, out):
                new = out
                for op in ops:
                    new = op(new, ctx)
                return None if new is out else new
            return fn

        handles = [modules[site].register_forward_hook(hook(ops)) for site, ops in p.steps]
        try:
            return model(*batch.inputs)
        finally:
            for h in handles:
                h.remove()

    def _wrap(self, model: nn.Module, p: Pass):
        """The model's nnsight wrapper (made once per model) and the pass's (envoy, ops) list."""
        cached = self._envoys.get(id(model))
        if cached is None or cached[0]._module is not model:
            from nnsight import NNsight

            nn_model = NNsight(model)
            envoys = {}
            for name in self.plan.site_order:
                env = nn_model
                for part in name.split("."):
                    env = env[int(part)] if part.isdigit() else getattr(env, part)
                envoys[name] = env
            cached = self._envoys[id(model)] = (nn_model, envoys, {})
        nn_model, envoys, steps = cached
        if id(p) not in steps:
            steps[id(p)] = (p, [(envoys[site], ops) for site, ops in p.steps])  # p kept alive: ids stay unique
        return nn_model, steps[id(p)][1]

    # --- freezes ---------------------------------------------------------------------------

    def _slices(self, model: nn.Module, step: int):
        if not self.plan.freezes:
            return
        params = dict(model.named_parameters())
        for c in self.plan.freezes:
            if c.when.active(step, True, self.plan.total_steps):
                p = params[c.spec.param]
                axis = param_head_axis(c.spec.param)
                index = (slice(None),) * len(p.shape) if c.heads is None else \
                    (slice(None),) * axis + (list(c.heads),)
                yield c, p, index

    @torch.no_grad()
    def _apply_freeze_sources(self, model: nn.Module, step: int, training: bool) -> None:
        for c, p, index in self._slices(model, step):
            if c.values is not None and c.index not in self._applied_sources:
                p[index] = c.values[c.spec.param][index].to(p.dtype)
                self._applied_sources.add(c.index)

    def after_backward(self, model: nn.Module, step: int) -> None:
        self._snapshots = []
        for _c, p, index in self._slices(model, step):
            if p.grad is not None:
                p.grad[index] = 0
            self._snapshots.append((p, index, p.detach()[index].clone()))

    @torch.no_grad()
    def after_update(self, model: nn.Module, step: int) -> None:
        for p, index, value in self._snapshots:
            p[index] = value
        self._snapshots = []
