"""The clamp-kind interface: what one module must declare to add a kind of clamp.

A clamp kind is a pydantic model (its schema: the keys a protocol writes) that subclasses
:class:`ClampSpec` — or :class:`SiteClamp` for the common case of writing values at one hook
site — and answers the engine's questions. The planner, the nnsight and hooks engine, the
compiled path and mixed-condition ensembles call only these methods: none of them names a kind.
Built-in kinds live in :mod:`optolab.clamps.kinds`, one module each; third parties register
theirs by entry point (group ``optolab.clamps``) or write ``kind: package.module:Class``
(:mod:`optolab.clamps.registry`).

Rules for a kind:
- **Schema.** Fields are strict (``extra="forbid"``; no NaN/inf). ``KIND`` names the kind as
  protocols write it. Cross-field checks raise :class:`~optolab.core.errors.SpecError`.
- **Plan** (:meth:`ClampSpec.plan`): check the clamp against the dry run (sites, shapes, heads,
  the task) and return a :class:`Planned`; raise ``OptolabError`` naming ``clamps.<i>.<field>``
  for anything a user can get wrong. Files it reads are loaded here, once, into ``data``.
- **Passes.** A program runs the passes its active clamps need, by position: ``clean`` (0, no
  clamps: a reference) and ``main`` (100) are known to all; a kind that needs another pass
  declares it with its position in :attr:`ClampSpec.needs` (``{"shifted": 10}``, a mapping;
  a set names known passes only), so a new pass is one module. Passes of equal position run by
  name; one name has one position in a protocol (the planner checks). ``main`` runs unless an
  active clamp :meth:`~ClampSpec.excludes_main` (it defines the logits from another pass).
- **Ops** (:meth:`ClampSpec.contribute`): add ``op(out, ctx) -> Tensor`` at ``(pass, site,
  rank)``. Ranks order the ops at one site: 0 read the input, 1 preserve, 2 clamps, 3 recipe
  writes, 4 records, 5 saves. An op never writes in place into ``out`` (autograd saved it, and
  nnsight assigns the result back): it returns a new tensor (``torch.where`` on the selection).
  Its value and gradient stay finite on any activation: the compiled path runs a windowed
  clamp's ops outside its window too, discarded by ``torch.where`` (:mod:`optolab.clamps.engine`).
- **What an op may read**: the activation ``out`` (as earlier ops left it), the pass context
  (:class:`~optolab.clamps.values.PassContext`): the batch, what earlier ops recorded, what
  :meth:`ClampSpec.prepare` computed outside the passes, the call's step as tensors
  (:meth:`PassContext.clock <optolab.clamps.values.PassContext.clock>`: step, the window's
  start and stop, the fraction elapsed), and random numbers from :meth:`PassContext.normal
  <optolab.clamps.values.PassContext.normal>` / ``normal_like`` (stream ``c.index``) — never
  global RNG state, a Python number made from a tensor (``float(clock.fraction)``: the compiled
  path would need a graph per step), or anything that differs between eager, compiled and
  vmapped calls. Caches keyed by shape are allowed (the compiled path warms them with one eager
  call).
- **Randomness.** The planner runs every forward clamp once on its dry run and records whether
  its ops draw (``Planned.draws``); a kind may declare it instead (``stochastic``). A clamp that
  draws is never shared across the conditions of an ensemble: each condition draws with its own
  clamp index, as its solo run does.
- **Updates.** A kind that acts on parameters rather than activations sets
  ``acts_on_forward = False`` and implements :meth:`ClampSpec.after_backward` and
  :meth:`ClampSpec.after_update` (as ``freeze``).
- **Packing.** ``unpackable`` (a reason) keeps runs using the kind out of ensembles; ``shareable``
  says a clamp every condition of a union has may act once ungated (never where it draws random
  numbers: :attr:`Planned.shareable`); :meth:`pack_constraint` returns what members of one
  ensemble must agree on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import BeforeValidator, Field
from torch import Tensor

from optolab.clamps.sites import SiteInfo, canonical, resolve_positions, selection_mask, site_info, suggest
from optolab.clamps.values import PassContext
from optolab.core.errors import OptolabError, SpecError
from optolab.core.schedule import Window
from optolab.core.strict import StrictModel

CLEAN, MAIN = 0, 100  # the positions of the passes every program knows (see the module rules)
Op = Callable[[Tensor, PassContext], Tensor]
TRUE = torch.ones((), dtype=torch.bool)


Heads = Union[Literal["all"], list[Annotated[int, Field(strict=True)]]]
Positions = Union[Literal["all", "query", "labels", "exemplars"], list[Annotated[int, Field(strict=True)]]]


def no_empty(v: Any) -> Any:
    if isinstance(v, list) and not v:
        raise SpecError("", "an empty list selects nothing.", "omit the field (all), or list at least one index.")
    return v


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
class Planned:
    """One clamp checked against the model: its spec, its step range, and (site kinds) where it
    acts; ``data`` holds what it loaded (a tensor, a frozen model, parameter values)."""

    index: int
    spec: ClampSpec
    when: When
    site: SiteInfo | None = None
    heads: tuple[int, ...] | None = None
    positions: object = "all"  # as written; resolved per sequence length at run time
    data: Any = None
    draws: bool = False  # its ops draw random numbers (found by the planner's probe, or declared)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def shareable(self) -> bool:
        """It may act once, ungated, for every condition of a union that has it: its kind says so
        and it draws no random numbers (each condition draws with its own clamp index)."""
        return self.spec.shareable and not self.draws

    def always(self, total: int) -> Planned:
        """This clamp acting at every evaluation and no training step (post-hoc evaluation)."""
        return replace(self, when=When(0, total, train=False, eval=self.when.eval))


@dataclass
class PlanContext:
    """What :meth:`ClampSpec.plan` may look at: the dry run and the protocol's setting."""

    model: Any  # a freshly built model (parameters, shapes)
    batch: Any  # the two-sequence batch of the dry run
    shapes: dict[str, tuple[int, ...]]  # every site's shape, in forward order
    task: Any
    cfg: Any  # ModelConfig
    planned: list[Planned] = field(default_factory=list)  # the clamps before this one

    @property
    def exemplar_label(self) -> bool:
        return self.cfg.input_mode == "exemplar_label"

    def error(self, i: int, field_: str, message: str, fix: str) -> OptolabError:
        return OptolabError(message, field=f"clamps.{i}.{field_}" if field_ else f"clamps.{i}", fix=fix)

    def check_layer(self, i: int, layer: int, field_: str = "layer") -> None:
        if layer >= self.cfg.n_layers:
            raise self.error(i, field_, f"layer {layer} is out of range: the model has {self.cfg.n_layers} layers.",
                             f"use 0..{self.cfg.n_layers - 1}.")

    def check_heads(self, i: int, heads, field_: str = "heads") -> tuple[int, ...] | None:
        if heads == "all":
            return None
        n = self.cfg.n_heads
        for h in heads:
            if not 0 <= h < n:
                raise self.error(i, field_, f"head {h} is out of range: the model has {n} heads per layer.",
                                 f"use head indices 0..{n - 1}.")
        return tuple(sorted(set(heads)))


def pass_positions(specs: Iterable[ClampSpec]) -> dict[str, int]:
    """Each pass ``specs`` may need, and ``clean`` and ``main``, with its position (see the module
    rules). Raises ValueError for a pass named without a position, or given two."""
    positions = {"clean": CLEAN, "main": MAIN}
    for spec in specs:
        if isinstance(spec.needs, Mapping):
            for name, at in spec.needs.items():
                if positions.setdefault(name, at) != at:
                    raise ValueError(f"the pass '{name}' is at position {positions[name]} for one clamp and {at} "
                                     f"for a '{spec.kind}' clamp")
        for name in spec.needs:
            if name not in positions:
                raise ValueError(f"a '{spec.kind}' clamp needs the pass '{name}' without a position; declare "
                                 f"needs = {{'{name}': <0..100>}}")
    return positions


def pass_order(names: Iterable[str], positions: Mapping[str, int]) -> list[str]:
    return sorted(set(names), key=lambda n: (positions[n], n))


class Parts:
    """A program being built: ranked ops per pass (see the module rules), and its output."""

    def __init__(self, names: list[str], exemplar_label: bool) -> None:
        self.exemplar_label = exemplar_label
        self.ops: dict[str, list[tuple[str, int, Op]]] = {n: [] for n in names}
        self.output: tuple[str, str, int] | None = None  # (pass, scores site, head) whose scores are the logits
        self._wrap: Callable[[Op], Op] | None = None  # what the contributing clamp's ops go through

    @property
    def forward_passes(self) -> list[str]:
        """The passes the model goes on with (every pass but the clean reference)."""
        return [n for n in self.ops if n != "clean"]

    def add(self, pass_: str, site: str, rank: int, op: Op) -> None:
        if pass_ in self.ops:
            self.ops[pass_].append((site, rank, op if self._wrap is None else self._wrap(op)))

    @classmethod
    def of(cls, active: list[Planned], exemplar_label: bool,
           wrap: Callable[[Planned, Op], Op | None] | None = None) -> Parts:
        """The passes ``active`` need, in order (``main`` unless one excludes it), with their ops;
        ``wrap(c, op)``, where given, stands in for each op clamp ``c`` adds (None: ``op`` itself)."""
        specs = [c.spec for c in active]
        needed = set().union(*(set(s.needs) for s in specs))
        if not any(s.excludes_main() for s in specs):
            needed.add("main")
        parts = cls(pass_order(needed, pass_positions(specs)), exemplar_label)
        for c in active:  # protocol order
            parts._wrap = None if wrap is None else (lambda op, c=c: wrap(c, op) or op)
            c.spec.contribute(c, parts)
        parts._wrap = None
        return parts


def record(key: tuple[str, str]) -> Op:
    """An op that keeps the activation (with its gradient) as ``ctx.recorded[key]`` for a later op
    or pass; ``key`` is (pass, site)."""
    def op(out: Tensor, ctx: PassContext) -> Tensor:
        ctx.recorded[key] = out
        return out
    return op


class ClampSpec(StrictModel):
    """Fields every clamp has, and the engine's questions (see the module rules)."""

    KIND: ClassVar[str] = ""
    # passes it adds while it acts: {name: position} declares a new one (0 < position < 100)
    needs: ClassVar[Mapping[str, int] | frozenset[str]] = frozenset()
    acts_on_forward: ClassVar[bool] = True
    unpackable: ClassVar[str | None] = None  # why runs with it cannot train in an ensemble
    shareable: ClassVar[bool] = False  # may act once, ungated, for every condition of a union
    stochastic: ClassVar[bool | None] = None  # draws random numbers; None: the planner's probe finds out
    defines_output: ClassVar[bool] = False

    kind: str
    name: str | None = Field(None, description="a label for plots and messages")
    window: Window = Field(default_factory=Window)
    apply_at: Literal["train", "eval", "both"] = "both"

    # --- planning --------------------------------------------------------------------------

    def plan(self, i: int, ctx: PlanContext, when: When) -> Planned:
        return Planned(i, self, when)

    def writes(self, c: Planned) -> list[tuple[str, tuple[int, ...] | None, object]]:
        """``(site, heads, positions)`` it writes, for the check that no two clamps write the same
        entries at the same steps."""
        return []

    # --- the forward -----------------------------------------------------------------------

    def excludes_main(self) -> bool:
        """While it acts, the program has no main pass (it defines the logits from another)."""
        return False

    def always_excludes_main(self) -> bool:
        """It excludes the main pass at every step and phase of the run."""
        return False

    def contribute(self, c: Planned, parts: Parts) -> None:
        """Add this clamp's ops to the program (it is active)."""

    def prepare(self, c: Planned, batch) -> Tensor | None:
        """A tensor computed before the passes, outside any trace or compiled graph (a graft's
        source activation), which its ops read as ``ctx.prepared[c.index]``."""
        return None

    # --- updates ---------------------------------------------------------------------------

    def apply_source(self, c: Planned, params: dict) -> None:
        """Before the first step it acts at (freeze: set the parameter from a checkpoint)."""

    def after_backward(self, c: Planned, params: dict) -> list:
        """After ``backward`` and before the optimizer step; returns what :meth:`after_update` restores."""
        return []

    # --- packing and words -----------------------------------------------------------------

    def pack_constraint(self) -> object:
        """What every member of an ensemble must agree on with this clamp (None: nothing)."""
        return None

    def describe(self, c: Planned, words) -> str:
        """What it does, in plain words (``words``: :mod:`optolab.clamps.describe` helpers)."""
        return f"a '{self.kind}' clamp."


class SiteClamp(ClampSpec):
    """A clamp that writes a value on the selected entries of one site. A kind implements
    :meth:`fill` (the value of the selected entries); it may add checks (:meth:`check`) and load
    files (:meth:`load`)."""

    writes_values: ClassVar[bool] = True  # counts for the conflict check
    shareable: ClassVar[bool] = True
    site_rank: ClassVar[int] = 2

    site: str
    heads: Annotated[Heads, BeforeValidator(no_empty)] = "all"
    positions: Annotated[Positions, BeforeValidator(no_empty)] = "all"

    def plan(self, i: int, ctx: PlanContext, when: When) -> Planned:
        name = canonical(self.site)
        if name not in ctx.shapes:
            raise ctx.error(i, "site", f"unknown hook site '{self.site}'.", suggest(self.site, list(ctx.shapes)))
        info = site_info(name)
        heads = ctx.check_heads(i, self.heads)
        if heads is not None and info.head_axis is None:
            raise ctx.error(i, "heads", f"'{name}' has no head axis.",
                            "remove 'heads', or use a per-head site such as blocks.0.attn.hook_z or hook_result.")
        n = ctx.shapes[name][info.pos_axis]
        positions = self.selected_positions()
        try:
            resolve_positions(positions, n, ctx.exemplar_label)
        except ValueError as e:
            raise ctx.error(i, "positions", str(e) + ".",
                            "use all, query, labels, exemplars or indices inside the sequence.") from None
        self.check(i, ctx, info)
        c = Planned(i, self, when, info, heads, positions)
        c.data = self.load(i, ctx, c)
        return c

    def selected_positions(self) -> str | tuple[int, ...]:
        return self.positions if isinstance(self.positions, str) else tuple(self.positions)

    def check(self, i: int, ctx: PlanContext, info: SiteInfo) -> None:
        """Kind-specific checks against the dry run (raise ``ctx.error``)."""

    def load(self, i: int, ctx: PlanContext, c: Planned) -> Any:
        """Files the clamp reads, loaded once at planning (kept as ``c.data``)."""
        return None

    def writes(self, c: Planned):
        return [(c.site.name, c.heads, c.positions)] if self.writes_values else []

    def fill(self, c: Planned) -> Callable[[Tensor, PassContext], Tensor]:
        """``fn(out, ctx)``: the value of the selected entries (broadcastable to ``out``)."""
        raise NotImplementedError

    def op(self, c: Planned, exemplar_label: bool, value: Callable[[Tensor, PassContext], Tensor] | None = None) -> Op:
        """``where(selection, value(out), out)`` (``value``: :meth:`fill`'s, unless given); the
        selection mask is cached per shape."""
        value = self.fill(c) if value is None else value
        info, heads, positions = c.site, c.heads, c.positions
        masks: dict[Any, Tensor | None] = {}  # per activation shape (lengths can vary per batch) and device

        def op(out: Tensor, ctx: PassContext) -> Tensor:
            key = (out.shape, out.device)
            if key not in masks:
                n = out.shape[info.pos_axis] if info.pos_axis is not None else 0
                pos = None if info.pos_axis is None else resolve_positions(positions, n, exemplar_label, strict=False)
                mask = selection_mask(tuple(out.shape), info.head_axis, heads, info.pos_axis, pos)
                masks[key] = (TRUE if mask is None else mask).to(out.device)
            return torch.where(masks[key], value(out, ctx), out)

        return op

    def contribute(self, c: Planned, parts: Parts) -> None:
        op = self.op(c, parts.exemplar_label)
        for p in parts.forward_passes:
            parts.add(p, c.site.name, self.site_rank, op)

    def describe(self, c: Planned, words) -> str:
        return f"{words.where(c)} is changed by a '{self.kind}' clamp."

