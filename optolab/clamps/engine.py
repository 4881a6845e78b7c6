"""The clamp engine: runs a :class:`~optolab.clamps.plan.Plan` on every forward.

Rules:
- A call's *program* holds the passes the active clamps need, by their declared positions
  (:mod:`optolab.clamps.kind`: ``clean``, a layer clamp's ``shifted``, ``main``, …), each a list
  of (site, ops) in forward order;
  the kinds contribute the ops, the engine names no kind. One nnsight trace per pass (the
  authors' three-pass layer clamp takes two traces here: the embedding it needs is read at the
  start of each pass).
- In a pass, sites are visited in forward order; at each site the activation is read once,
  every op for that site runs by rank, then in protocol order (``preserve`` first, so others
  win), and the result is assigned back to ``.output``. Nothing is written in place: ops build
  new tensors with ``torch.where``. The logits are saved in the trace; the caller takes the loss,
  the backward and the optimizer step after the ``with`` block.
- Which clamps act is decided per call from the step and the phase (training or evaluation);
  the program for each distinct set of active clamps is built once and cached.
- Windows as inputs (``windows=True``: the compiled path, so that moving a window, or crossing
  its boundary, compiles nothing new). A clamp whose acting changes nothing but its own ops
  (:func:`windowed`: no pass of its own, no output, nothing prepared) and that acts in the
  phase at some steps but not all is *gated*: its ops are in the program at every step of the
  phase, each as ``where(live[row, index], op(out), out)``, where ``live`` is a bool table made
  outside the program from the step, the phase and the windows (:meth:`ClampForward.live`;
  ``row`` is its condition in a union). The program is then keyed by the clamps it holds, never
  by a window: one program, so one graph, for every step and every window of those clamps. A
  gated-off op runs and is discarded: its value and its gradient are the activation's as it came
  (an op must be finite where it is discarded, as ``torch.where`` multiplies its gradient by
  zero). Clamps that add passes, define the output or prepare inputs still switch programs at
  their boundaries (running their passes outside their windows would cost a pass per step).
  Which parameters a step's loss does not depend on is still asked of the program of the clamps
  acting now (:meth:`ClampForward.program_at`), so updates equal the switching path's.
- Each call gets a random key from the run's seeds, the step and the phase
  (:mod:`optolab.clamps.rng`) and its step as a tensor (:func:`~optolab.clamps.values.call_inputs`);
  ops that draw random numbers or follow a schedule read them from the pass context.
- ``backend="hooks"`` runs the very same ops through the model's site hooks
  (:class:`~optolab.model.hooks.SiteHooks`) instead of nnsight (a fast path; tests prove it gives
  bit-identical parameters for every kind). nnsight is the default.
- Clamps on parameters (``freeze``) act around the optimizer step through
  :meth:`~ClampForward.after_backward` and :meth:`~ClampForward.after_update`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optolab.clamps.kind import ClampSpec, Op, Parts, Planned
from optolab.clamps.plan import Plan
from optolab.clamps.rng import call_key
from optolab.clamps.values import PassContext, call_inputs
from optolab.model.forward import Forward, PlainForward
from optolab.model.hooks import SiteHooks
from optolab.tasks.base import Batch


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
    prepared: list[Planned]  # clamps that compute an input before the passes (ClampSpec.prepare)
    # a union's (optolab.clamps.union): each condition's output, (pass, scores site, head) or
    # (pass, None, None) for that pass's logits; a member takes its condition's (ctx.gate)
    outputs: list[tuple[str, str | None, int | None]] | None = None


RankedOps = list[tuple[str, int, Op]]  # (site, rank, op)


def windowed(c: Planned) -> bool:
    """Clamp ``c``'s window can be an input of the program (see the module rules): while it does
    not act, its ops passing the activation through is all that differs."""
    s = c.spec
    return (s.acts_on_forward and not s.needs and not s.excludes_main() and not s.defines_output
            and type(s).prepare is ClampSpec.prepare)


def live_op(op: Op, row: int, index: int) -> Op:
    """``op`` where clamp ``index`` of condition ``row`` acts at this call (``ctx.live``), else
    the activation as it came."""
    def fn(out: Tensor, ctx: PassContext) -> Tensor:
        return torch.where(ctx.live[row, index], op(out, ctx), out)
    return fn


def program_parts(plan: Plan, active: list[Planned], save: Sequence[str], gated: frozenset[int] = frozenset(),
                  row: int = 0) -> tuple[list[tuple[str, RankedOps]], tuple[str, str, int] | None]:
    """The passes of the program for ``active`` as ranked op lists, in run order, and its copy
    output. ``rank`` orders the ops at one site (:mod:`optolab.clamps.kind`), so every record and
    save sees the value the model goes on with. The ops of clamps in ``gated`` (indices) act by
    ``ctx.live[row]`` (:func:`live_op`)."""
    parts = Parts.of(active, plan.exemplar_label,
                     lambda c, op: live_op(op, row, c.index) if c.index in gated else None)
    names = list(parts.ops)
    parts.ops[names[-1]] += [(s, 5, save_op(s)) for s in save]
    return list(parts.ops.items()), parts.output


def assemble(plan: Plan, name: str, ops: RankedOps) -> Pass:
    """One pass: ``ops`` grouped by site in forward order, by rank within a site (stable, so
    ops of one rank keep their list order: protocol order)."""
    by_site: dict[str, list[Op]] = {}
    for site, _rank, op in sorted(ops, key=lambda t: (plan.site_order[t[0]], t[1])):
        by_site.setdefault(site, []).append(op)
    return Pass(name, list(by_site.items()))


def build_program(plan: Plan, active: list[Planned], save: Sequence[str],
                  gated: frozenset[int] = frozenset()) -> Program:
    parts, output = program_parts(plan, active, save, gated)
    prepared = [c for c in active if type(c.spec).prepare is not ClampSpec.prepare]
    return Program([assemble(plan, name, ops) for name, ops in parts], output, prepared)


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
    label_pos = torch.arange(1, 2 * labels.shape[1], 2, device=scores.device)
    row = scores[:, head, -1, label_pos]  # [batch, n_lab]
    onehot = torch.nn.functional.one_hot(labels, n_labels).bool()  # [batch, n_lab, n_labels]
    per_label = torch.logsumexp(row[:, :, None].masked_fill(~onehot, float("-inf")), dim=1)
    query = torch.where(onehot.any(1), per_label, torch.full_like(per_label, -1e9))
    return torch.cat([logits[:, :-1], query[:, None]], dim=1)


def live_table(rows: Sequence[Sequence[bool]], device: torch.device, cache: dict) -> Tensor:
    """``PassContext.live``: one row per condition (padded with False), on ``device``; made once
    per distinct table and kept in ``cache`` (a run has a few: they change at window boundaries)."""
    width = max([1, *(len(r) for r in rows)])
    key = (tuple(tuple(r) + (False,) * (width - len(r)) for r in rows), str(device))
    table = cache.get(key)
    if table is None:
        table = cache[key] = torch.tensor(key[0], dtype=torch.bool, device=device)
    return table


class ClampForward(Forward):
    """A :class:`~optolab.model.forward.Forward` that applies a protocol's clamps. ``seeds``
    (init, data) key the random numbers ops draw."""

    def __init__(self, plan: Plan, backend: str = "nnsight", seeds: tuple[int, int] = (0, 0)) -> None:
        self.plan = plan
        self.backend = backend
        self.seeds = seeds
        self._programs: dict[tuple, Program] = {}
        self._live: dict[tuple, Tensor] = {}
        self._gated: dict[bool, frozenset[int]] = {}
        self._envoys: dict[int, tuple] = {}  # id(model) -> (model, its NNsight wrapper, envoys, passes)
        self._hooks: SiteHooks | None = None
        self._plain = PlainForward()
        self._applied_sources: set[int] = set()
        self._snapshots: list[tuple[nn.Parameter, tuple, Tensor]] = []
        self._acting = [c for c in plan.clamps if c.spec.acts_on_forward]
        self._updating = [c for c in plan.clamps if not c.spec.acts_on_forward]

    # --- which clamps act ----------------------------------------------------------------

    def active(self, step: int, training: bool) -> list[Planned]:
        total = self.plan.total_steps
        return [c for c in self._acting if c.when.active(step, training, total)]

    def gated(self, training: bool) -> frozenset[int]:
        """The clamps (indices) whose windows are inputs of the program in this phase (see the
        module rules): windowed kinds acting at some of the phase's steps but not at all."""
        gated = self._gated.get(training)
        if gated is None:
            total = self.plan.total_steps
            gated = self._gated[training] = frozenset(
                c.index for c in self._acting if windowed(c) and (c.when.train if training else c.when.eval)
                and not (c.when.start <= 0 and c.when.stop >= total))
        return gated

    def in_program(self, step: int, training: bool, windows: bool) -> tuple[list[Planned], frozenset[int]]:
        """The clamps in this call's program (protocol order) and which of them are gated: the
        active ones, and with ``windows`` every gated one."""
        if not windows:
            return self.active(step, training), frozenset()
        gated = self.gated(training)
        total = self.plan.total_steps
        return [c for c in self._acting if c.index in gated or c.when.active(step, training, total)], gated

    def live(self, step: int, training: bool) -> list[bool]:
        """Which clamps (by index) act at this call: ``PassContext.live``'s row for this plan."""
        total = self.plan.total_steps
        row = [False] * (1 + max((c.index for c in self.plan.clamps), default=-1))
        for c in self._acting:
            row[c.index] = c.when.active(step, training, total)
        return row

    def program_at(self, step: int, training: bool, save: Sequence[str] = (),
                   windows: bool = False) -> Program | None:
        """The program of this call (None when no clamp is in it), built once per set of clamps."""
        clamps, gated = self.in_program(step, training, windows)
        if not clamps:
            return None
        key = (tuple(c.index for c in clamps), tuple(sorted(gated)), tuple(save))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = build_program(self.plan, clamps, save, gated)
        return program

    def __call__(self, model: nn.Module, batch: Batch, *, step: int, training: bool,
                 save: Sequence[str] = (), seeds: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """As any Forward; ``seeds`` stands in for the forward's own (an ensemble member's evals)."""
        program, inputs = self.prepare(model, batch, step, training, save, seeds)
        if program is None:
            return self._plain(model, batch, step=step, training=training, save=save)
        ctx = PassContext(batch, **inputs)
        logits = {p.name: self._run(model, p, batch, ctx) for p in program.passes}
        return program_logits(program, logits, ctx, batch), ctx.saved

    def prepare(self, model: nn.Module, batch: Batch, step: int, training: bool,
                save: Sequence[str] = (), seeds: tuple[int, int] | None = None,
                windows: bool = False) -> tuple[Program | None, dict]:
        """Everything before the passes: parameter clamps' sources applied, the program of the
        clamps active at ``step`` (with ``windows``, of every clamp gated in the phase too; None
        when no clamp is in it), and the call's inputs to the pass context: what clamps prepare
        outside the passes, the random key, the step and, for a gated program, ``live``."""
        self._apply_sources(model, step)
        program = self.program_at(step, training, save, windows)
        if program is None:
            return None, {}
        init, data = self.seeds if seeds is None else seeds
        device = batch.targets.device
        live = live_table([self.live(step, training)], device, self._live) if windows and self.gated(training) \
            else None
        return program, {"prepared": {c.index: c.spec.prepare(c, batch) for c in program.prepared},
                         **call_inputs(call_key(init, data, step, training, device), step, live)}

    # --- one pass ------------------------------------------------------------------------

    def _run(self, model: nn.Module, p: Pass, batch: Batch, ctx: PassContext) -> Tensor:
        if self.backend == "hooks":
            if self._hooks is None or self._hooks.model is not model:
                self._hooks = SiteHooks(model)
            self._hooks.cover(site for site, _ops in p.steps)
            with self._hooks.acting(dict(p.steps), ctx):
                return model(*batch.inputs)
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

    def _wrap(self, model: nn.Module, p: Pass):
        """The model's nnsight wrapper (made once per model) and the pass's (envoy, ops) list."""
        cached = self._envoys.get(id(model))
        if cached is None or cached[0] is not model:
            from nnsight import NNsight

            nn_model = NNsight(model)
            envoys = {}
            for name in self.plan.site_order:
                env = nn_model
                for part in name.split("."):
                    env = env[int(part)] if part.isdigit() else getattr(env, part)
                envoys[name] = env
            cached = self._envoys[id(model)] = (model, nn_model, envoys, {})
        _, nn_model, envoys, steps = cached
        if id(p) not in steps:
            steps[id(p)] = (p, [(envoys[site], ops) for site, ops in p.steps])  # p kept alive: ids stay unique
        return nn_model, steps[id(p)][1]

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    # --- clamps on parameters ----------------------------------------------------------------

    def _updating_now(self, step: int) -> list[Planned]:
        return [c for c in self._updating if c.when.active(step, True, self.plan.total_steps)]

    def _apply_sources(self, model: nn.Module, step: int) -> None:
        for c in self._updating_now(step):
            if c.index not in self._applied_sources:
                c.spec.apply_source(c, dict(model.named_parameters()))
                self._applied_sources.add(c.index)

    def after_backward(self, model: nn.Module, step: int) -> None:
        self._snapshots = []
        now = self._updating_now(step)
        if now:
            params = dict(model.named_parameters())
            for c in now:
                self._snapshots += c.spec.after_backward(c, params)

    @torch.no_grad()
    def after_update(self, model: nn.Module, step: int) -> None:
        for p, index, value in self._snapshots:
            p[index] = value
        self._snapshots = []
