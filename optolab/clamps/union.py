"""Union programs: one forward for ensemble members whose clamps differ (mixed conditions).

Rules:
- A *condition* is one clamp list; the members of a condition share its plan. At each step the
  union holds every pass that any condition's program has at that step, in the engine's order
  (by the passes' declared positions: clean, shifted, ablated, main), and at each site every condition's ops, ordered as the engine orders
  one program's: site order, then rank, then condition, then the condition's own order. A
  member's own ops therefore run in the order of its solo program.
- Ops that write (ranks 1-3: preserve, clamps, the layer clamp's recipe writes) are gated per
  member: ``where(gate[k], op(out), out)``, where ``gate`` is the member's one-hot condition (a
  tensor; under ``vmap`` each member's own). ``where`` selects, it does not mix: a member's
  activations, logits and loss are exactly those of its solo program, and another condition's
  op sends it exactly zero gradient.
- A clamp of a shareable kind (:attr:`~optolab.clamps.kind.ClampSpec.shareable`) that every
  condition has (same spec but the name, same window), at a site no other op of any condition
  touches, acts once, ungated, in every pass but the clean one (T4's single-head ablation in all
  six conditions). Kinds that prepare inputs or record are not shareable, and no clamp that draws
  random numbers is (:attr:`~optolab.clamps.kind.Planned.shareable`: the planner's probe finds
  them), since each condition draws with its own clamp index.
- Records and saves are not gated. A record's key names its pass and site, and it sits after
  every write at its site, so two conditions' records of one key hold the same value.
- A pass that a member's own program lacks still runs for it, and nothing reads it: that is the
  union's cost. Sweeps pack only conditions with equal passes (:func:`pass_signature`).
- Each member's logits are its own condition's output (a pass's logits or a copy head's),
  selected by its gate (:func:`~optolab.clamps.engine.program_logits`).
- With one condition the union is that condition's own program, ungated: a seed ensemble runs
  exactly the solo program under ``vmap``.
- Saves (evaluations) sit at the end of each condition's last pass, gated: a member keeps the
  values of its own program's last pass (:func:`gated_save`).
- Windows as inputs (the compiled path asks with ``windows=True``): each condition's gated
  clamps (:mod:`optolab.clamps.engine`) are in the union at every step of the phase, acting by
  ``live[k, index]`` (row ``k``: condition ``k``), so conditions that differ only in their
  windows (a window scan) share one program, and one graph, at every step.
- Kinds that declare themselves unpackable (``graft``, ``freeze``) never reach a union
  (:func:`optolab.training.ensemble.why_not_packable`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import Tensor

from optolab.clamps.engine import (
    ClampForward,
    Program,
    assemble,
    build_program,
    live_op,
    live_table,
    program_parts,
    saving,
)
from optolab.clamps.kind import Op, Planned, pass_order, pass_positions
from optolab.clamps.plan import Plan
from optolab.clamps.rng import call_key
from optolab.clamps.values import call_inputs
from optolab.model.forward import Forward

WRITES = (1, 2, 3)  # ranks of ops that change the activation (engine.program_parts)


def pass_signature(clamps: Sequence) -> tuple[str, ...]:
    """The passes a protocol's clamps (specs) can need, over its whole run."""
    passes = set().union(*(set(c.needs) for c in clamps if c.acts_on_forward))
    if not any(c.always_excludes_main() for c in clamps):
        passes.add("main")
    return tuple(pass_order(passes, pass_positions(clamps)))


def gated(op: Op, k: int) -> Op:
    def fn(out: Tensor, ctx) -> Tensor:
        return torch.where(ctx.gate[k], op(out, ctx), out)
    return fn


def gated_save(name: str, k: int) -> Op:
    """Save ``name`` for condition ``k``'s members: conditions whose last pass differs save in
    different passes, and a later pass must not overwrite an earlier one's save for them."""
    def fn(out: Tensor, ctx) -> Tensor:
        prev = ctx.saved.get(name)
        value = out.detach()
        ctx.saved[name] = value if prev is None else torch.where(ctx.gate[k], value, prev)
        return out
    return fn


def union_program(plans: Sequence[Plan | None], actives: Sequence[list[Planned]],
                  save: Sequence[str] = (), windowed: Sequence[frozenset[int]] | None = None) -> Program:
    """One program for members of several conditions (``plans[k]``, its clamps in the program
    ``actives[k]``, of which ``windowed[k]`` act by ``ctx.live[k]``), saving ``save``; see the
    module rules."""
    windowed = [frozenset()] * len(plans) if windowed is None else windowed
    live = [k for k, a in enumerate(actives) if a]
    if not live:
        return saving(save)
    if len(plans) == 1:
        return build_program(plans[0], actives[0], save, windowed[0])
    common, actives = _common(plans, actives)
    by_pass: dict[str, list] = {}
    outputs: list[tuple[str, str | None, int | None]] = []
    for k, (plan, active) in enumerate(zip(plans, actives)):
        if active:
            parts, output = program_parts(plan, active, (), windowed[k], row=k)
        else:
            parts, output = [("main", [])], None
        last = parts[-1][0]
        for name, ops in parts:
            ranked = [(site, rank, gated(op, k) if rank in WRITES else op) for site, rank, op in ops]
            if name == last:
                ranked += [(s, 5, gated_save(s, k)) for s in save]
            by_pass.setdefault(name, []).extend(ranked)
        outputs.append(output if output is not None else (last, None, None))
    plan = plans[live[0]]
    # a common clamp is the same, in the same window, in every condition: condition 0's row says when it acts
    shared = [(c.site.name, c.spec.site_rank, _maybe_live(c.spec.op(c, plan.exemplar_label), c, windowed[0]))
              for c in common]
    positions = pass_positions(c.spec for active in actives for c in active)
    passes = [assemble(plan, name, by_pass[name] + (shared if name != "clean" else []))
              for name in pass_order(by_pass, positions)]
    return Program(passes, None, [], outputs)


def _maybe_live(op: Op, c: Planned, windowed: frozenset[int]) -> Op:
    return live_op(op, 0, c.index) if c.index in windowed else op


def _common(plans: Sequence[Plan | None], actives: Sequence[list[Planned]]):
    """Clamps every condition has (same spec but the name, same window) at a site no other op of
    any condition touches, so their order against other ops cannot matter: they act once,
    ungated, in every pass but the clean one (where each condition's own copy would act). The
    conditions' remaining active clamps."""
    def key(c: Planned) -> str:
        return json.dumps(c.spec.model_dump(mode="json", exclude={"name"}), sort_keys=True) + repr(c.when)

    keyed = [{key(c): c for c in active if c.shareable} for active in actives]
    shared = set(keyed[0]).intersection(*keyed[1:])
    candidates = [keyed[0][k] for k in shared]
    sites = [c.site.name for c in candidates]
    rest = [[c for c in active if key(c) not in shared] for active in actives]
    taken = {site for plan, active in zip(plans, rest) if active
             for _name, ops in program_parts(plan, active, ())[0] for site, _rank, _op in ops}
    common = [c for c in candidates if c.site.name not in taken and sites.count(c.site.name) == 1]
    keep = {key(c) for c in common}
    common.sort(key=lambda c: c.index)
    return common, [[c for c in active if key(c) not in keep] for active in actives]


class Conditions:
    """The members' conditions: each member's clamps (one Forward per distinct clamp list) and,
    per step and phase, the one program every member runs, with each member's gate."""

    def __init__(self, forwards: Sequence[Forward], of_member: Sequence[int], device=None) -> None:
        self.forwards = list(forwards)
        self.of_member = list(of_member)
        self.device = torch.device("cpu") if device is None else device
        self.plans = [f.plan if isinstance(f, ClampForward) else None for f in self.forwards]
        # [member, condition]: each member's one-hot condition
        self.gates = torch.nn.functional.one_hot(torch.tensor(list(of_member)), len(self.forwards)).bool() \
            .to(self.device)
        self._programs: dict[tuple, Program] = {}
        self._live: dict[tuple, Tensor] = {}

    def gate(self, k: int) -> Tensor:
        """Condition ``k``'s one-hot gate (``[condition]``)."""
        return torch.arange(len(self.forwards), device=self.device) == k

    def _actives(self, step: int, training: bool) -> list[list[Planned]]:
        return [f.active(step, training) if isinstance(f, ClampForward) else [] for f in self.forwards]

    def key(self, step: int, training: bool = True) -> tuple:
        """What decides the programs at ``step``: each condition's active clamps."""
        return tuple(tuple(c.index for c in a) for a in self._actives(step, training))

    def _in_program(self, step: int, training: bool,
                    windows: bool) -> tuple[list[list[Planned]], list[frozenset[int]]]:
        """Each condition's clamps in the program at ``step``, and its gated ones (see the module rules)."""
        got = [f.in_program(step, training, windows) if isinstance(f, ClampForward) else ([], frozenset())
               for f in self.forwards]
        return [a for a, _ in got], [g for _, g in got]

    def program(self, step: int, training: bool = True, save: Sequence[str] = (), windows: bool = False) -> Program:
        """The union program at ``step``; with ``windows``, gated clamps act by ``ctx.live`` (:meth:`live`)."""
        actives, gated = self._in_program(step, training, windows)
        key = (tuple(tuple(c.index for c in a) for a in actives), training, tuple(save), windows)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = union_program(self.plans, actives, save, gated)
        return program

    def live(self, step: int, training: bool = True) -> Tensor | None:
        """``PassContext.live`` at ``step`` (a row per condition) for a program built with
        ``windows``; None where no condition has gated clamps."""
        if not any(f.gated(training) for f in self.forwards if isinstance(f, ClampForward)):
            return None
        rows = [f.live(step, training) if isinstance(f, ClampForward) else [] for f in self.forwards]
        return live_table(rows, self.device, self._live)

    def own_program(self, k: int, step: int) -> Program:
        """Condition ``k``'s own training program at ``step`` (as its solo run's)."""
        active = self._actives(step, True)[k]
        key = ("own", k, tuple(c.index for c in active))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = build_program(self.plans[k], active, ()) if active else saving(())
        return program

    def close(self) -> None:
        for f in self.forwards:
            f.close()

    def prepare(self, model, batch, step: int, training: bool, save: Sequence[str] = (),
                seeds: tuple[int, int] | None = None, windows: bool = False) -> tuple[Program, dict]:
        """As :meth:`ClampForward.prepare <optolab.clamps.engine.ClampForward.prepare>`: the union
        program of this call (nothing is prepared: grafts are never packed), the random key of
        the member whose ``seeds`` these are, the step and (with ``windows``) ``live``."""
        init, data = seeds if seeds is not None else (0, 0)
        key = call_key(init, data, step, training, batch.targets.device)
        return self.program(step, training, save, windows), {
            "prepared": {}, **call_inputs(key, step, self.live(step, training) if windows else None)}
