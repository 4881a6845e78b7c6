"""Ensembles: runs that share a model shape and training settings, trained together as one
batched model with a leading member axis. Members may differ in seeds and in their clamps.

Rules:
- Runs pack together when their resolved protocols are equal except ``name``, ``description``,
  the init and data seeds and ``clamps`` (:func:`pack_key`), and no clamp or setting couples
  parameters across the update (:func:`why_not_packable`: ``freeze`` and ``graft`` clamps,
  ``train.grad_clip``). Members with equal clamps share a *condition* (:func:`condition_key`).
  Each member keeps its own run directory, written by its own
  :class:`~optolab.training.runbook.RunBook`, exactly as if it had run alone.
- Training: each member trains on the solo run's batch for its data seed
  (``task.train_batch(seeds.data, step, …)``, or the shared ``data`` schedule's), drawn once per
  distinct data seed and a few steps ahead (:mod:`optolab.training.batches`; on the counter stream,
  every member's at once on the run's device); the forward pass is
  ``torch.func.vmap`` over members of the model's own ``forward`` with the member's parameters
  (``functional_call``), so every op runs once for all members. Clamps act through site hooks on
  a shared skeleton (:class:`~optolab.training.compiled.SiteDispatch`) running one program per
  step: a condition's own program when all members share it, else the union of the conditions'
  programs with each op gated to its condition's members (:mod:`optolab.clamps.union`).
  Compiled, clamp windows are inputs of that program (``ctx.live``): a window scan's conditions
  share one program, and one graph, at every step. The loss is each member's mean, summed: members share no
  parameter, so each gets exactly its own gradient; Adam is elementwise, so the stacked update is
  each member's own.
- The gradient comes from autograd (eager) or, with ``train.compile``, from
  ``torch.func.grad_and_value`` of that loss: the forward (every pass), the losses and the
  gradient are one compiled graph per program (as :mod:`optolab.training.compiled_step` does for a solo
  run). Fused Adam is called directly.
- Evals and checkpoints: at those steps a member's weights and Adam state are copied into a solo
  model and optimizer, which its RunBook checkpoints; evals run on one model shared by all
  members (loaded with each member's weights in turn) through its condition's protocol Forward,
  nnsight or compiled as a solo run's would; compiled with several conditions, through one union
  Forward gated to the member's condition (:class:`_MemberEval`), so compiled eval graphs are
  built once per ensemble, not per member or condition. Resuming reads the members' checkpoints
  back.
- Numbers equal the solo run's up to float summation order in batched matrix products; the
  tolerance is stated and tested in ``tests/test_ensemble.py`` (and ``tests/test_compiled.py``
  for compiled ensembles), for seed ensembles and mixed conditions.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from optolab.clamps.engine import Program
from optolab.clamps.rng import call_key
from optolab.clamps.values import call_inputs
from optolab.clamps.union import Conditions
from optolab.core.device import autocast, decide_compile, numerics, resolve_device, to_device
from optolab.core.errors import RunFailed
from optolab.model.checkpoint import list_checkpoints
from optolab.model.forward import Forward
from optolab.model.kernels import PLAIN_KERNELS
from optolab.model.transformer import build_model
from optolab.protocol.data_schedule import train_data
from optolab.protocol.schema import Protocol
from optolab.tasks import IGNORE, make_task
from optolab.tasks.base import Batch
from optolab.training.batches import Batches
from optolab.training.compiled import (
    CallKeys,
    CompiledForward,
    SiteDispatch,
    compile_fn,
    fresh_caches,
    step_options,
    unused_parameters,
)
from optolab.training.compiled_step import adam_, ensure_state, plain_adam
from optolab.training.runbook import RunBook
from optolab.training.trainer import make_forward, make_optimizer


def pack_key(protocol: Protocol) -> str:
    """Runs with equal keys can share an ensemble: everything but the name, description, init and
    data seeds, clamps and stop rule (``train.stop``) agrees (the eval seed too: a different eval set is a different
    measurement)."""
    data = protocol.resolved()
    for field in ("name", "description", "clamps"):
        data.pop(field, None)
    data["seeds"] = {k: v for k, v in data["seeds"].items() if k not in ("init", "data")}
    data["train"] = {k: v for k, v in data["train"].items() if k != "stop"}  # each member's own RunBook stops it
    return json.dumps(data, sort_keys=True, default=str)


def condition_key(protocol: Protocol) -> str:
    """Members with equal keys share a condition: the same clamps."""
    return json.dumps(protocol.resolved().get("clamps", []), sort_keys=True, default=str)


def why_not_packable(protocol: Protocol) -> str | None:
    for c in protocol.clamps:
        if c.unpackable is not None:
            return c.unpackable
    if protocol.train.grad_clip is not None:
        return "train.grad_clip takes a norm over all parameters"
    return None


def resumable_together(outs: Sequence[str | Path]) -> bool:
    """Members resume together only from the same checkpoint step (or all from scratch)."""
    last = {(list_checkpoints(Path(o) / "checkpoints") or [None])[-1] for o in outs}
    return len(last) == 1


def _batch_fields(batch: Batch) -> tuple[dict[str, Tensor], dict]:
    tensors = {k: v for k, v in vars(batch).items() if isinstance(v, Tensor)}
    tensors.update({f"inputs.{i}": t for i, t in enumerate(batch.inputs)})
    rest = {k: v for k, v in vars(batch).items() if k not in tensors and k != "inputs"}
    return tensors, rest


def _stack_batches(batches: list[Batch]) -> tuple[dict[str, Tensor], dict, int]:
    fields = [_batch_fields(b)[0] for b in batches]
    return {k: torch.stack([f[k] for f in fields]) for k in fields[0]}, _batch_fields(batches[0])[1], \
        len(batches[0].inputs)


def _stacked_fields(batch: Batch) -> tuple[dict[str, Tensor], dict, int]:
    """:func:`_stack_batches`' result for a batch already stacked on a member axis (``extra`` is
    the first member's, as there: the step reads no ``extra``)."""
    tensors, rest = _batch_fields(batch)
    rest["extra"] = {k: v[0] if isinstance(v, Tensor) else v for k, v in rest.get("extra", {}).items()}
    return tensors, rest, len(batch.inputs)


def _unstack_batch(tensors: dict[str, Tensor], rest: dict, n_inputs: int) -> Batch:
    inputs = tuple(tensors[f"inputs.{i}"] for i in range(n_inputs))
    kwargs = {k: v for k, v in tensors.items() if not k.startswith("inputs.")}
    return Batch(inputs=inputs, **kwargs, **rest)


def _member_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Each member's mean loss: ``logits [member, batch, pos, d_out]`` -> ``[member]``."""
    S = logits.shape[0]
    per_token = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE,
                                reduction="none").view(S, -1)
    return per_token.sum(1) / (targets != IGNORE).view(S, -1).sum(1)


class _MemberEval(Forward):
    """A member's evals through its condition's Forward, with the member's own seeds (its random
    keys); compiled with several conditions, through the ensemble's union Forward gated to the
    member's condition, so every condition's evals share one compiled graph per eval shape
    (:mod:`optolab.clamps.union`)."""

    def __init__(self, forward: Forward, seeds: tuple[int, int], gate: Tensor | None = None) -> None:
        self.forward, self.seeds, self.gate = forward, seeds, gate

    def __call__(self, model: nn.Module, batch: Batch, *, step: int, training: bool,
                 save: Sequence[str] = (), seeds: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        gate = {} if self.gate is None else {"gate": self.gate}
        return self.forward(model, batch, step=step, training=training, save=save, seeds=self.seeds, **gate)


class _Step:
    """One training step of every member: the vmapped forward (every pass of the step's
    program), each member's loss and the gradient (autograd; with ``compiled``,
    ``torch.func.grad_and_value`` in one compiled graph per program). Returns the stacked
    parameters' gradients and each member's loss."""

    def __init__(self, skeleton: nn.Module, conditions: Conditions, names: list[str], compiled: bool,
                 device: torch.device = torch.device("cpu"), options: dict | None = None) -> None:
        """``options``: the compiler's (default :func:`step_options`); ``benchmarks/gpu_check.py``
        adds ``triton.cudagraphs`` to capture the step once on a GPU. Training runs do not yet: it
        is untested on a GPU, and a captured graph's outputs are overwritten by its next replay, so
        every use of a step's gradients and losses must end before the next step."""
        self.conditions, self.names, self.compiled = conditions, names, compiled
        self.dispatch = SiteDispatch(skeleton)
        self.fn = compile_fn(self._grads, step_options(device) if options is None else options) if compiled \
            else self._grads
        self.keys = CallKeys()
        self._unused: dict[tuple, dict[str, list[int]]] = {}

    def __call__(self, step: int, params, buffers, tensors, keys: Tensor, rest: dict, n_inputs: int,
                 alive: Tensor) -> tuple[list[Tensor], Tensor]:
        """``keys``: each member's random key for this step (``[member, 2]``, :mod:`optolab.clamps.rng`)."""
        # compiled, windows are inputs (ctx.live): crossing a boundary or a window scan's conditions add no graph
        program = self.conditions.program(step, windows=self.compiled)
        gates = self.conditions.gates
        # the step reaches the ops as a tensor (optolab.clamps.values.call_inputs): one graph for every step
        shared = call_inputs(keys, step, self.conditions.live(step) if self.compiled else None)
        shared.pop("key")  # each member's own comes from ``keys``, under vmap
        if not self.compiled:  # autograd: eager, torch.func's grad transform costs ~10 % per op
            self.dispatch.cover(program)
            token = PLAIN_KERNELS.set(True)
            try:
                for p in params.values():
                    p.grad = None
                losses = _member_losses(self._logits(program, params, buffers, tensors, gates, keys, shared, rest,
                                                     n_inputs), tensors["targets"])
                torch.where(alive, losses, losses.new_zeros(())).sum().backward()
            finally:
                PLAIN_KERNELS.reset(token)
            return [params[n].grad for n in self.names], losses.detach()
        params = {n: p.detach() for n, p in params.items()}
        args = (program, params, buffers, tensors, gates, keys, shared, rest, n_inputs)
        self.dispatch.warm(program, tuple(t.shape for t in tensors.values()), lambda: self._logits(*args))
        with self.keys.guards(program, tensors, shared, rest, n_inputs):
            return self.fn(*args, alive)

    def unused(self, step: int, params, buffers, tensors, keys: Tensor, rest: dict,
               n_inputs: int) -> dict[str, list[int]]:
        """Per stacked parameter, the members whose own program at ``step`` does not depend on it
        at all (:func:`~optolab.training.compiled.unused_parameters`, probed once per condition and set of
        active clamps on one member of the condition): their solo runs would not update it."""
        key = self.conditions.key(step)
        found = self._unused.get(key)
        if found is None:
            skeleton, run, of_member = self.dispatch.model, self.dispatch.run, self.conditions.of_member
            by_condition = []
            for k in range(len(self.conditions.forwards)):
                m = of_member.index(k)
                program = self.conditions.own_program(k, step)
                self.dispatch.cover(program)
                own = {n: b[m] for n, b in buffers.items()}
                batch = _unstack_batch({n: t[m] for n, t in tensors.items()}, rest, n_inputs)

                inputs = {"prepared": {}, **call_inputs(keys[m], step)}

                def loss(p: dict, program=program, own=own, batch=batch, inputs=inputs) -> Tensor:
                    logits = run(program, batch, inputs, lambda *x: functional_call(skeleton, (p, own), x))[0]
                    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)

                by_condition.append(unused_parameters(loss, {n: p.detach()[m] for n, p in params.items()}))
            found = self._unused[key] = {
                n: members for n in params if (members := [i for i, k in enumerate(of_member) if n in by_condition[k]])}
        return found

    def _logits(self, program: Program, params, buffers, tensors, gates: Tensor, keys: Tensor,
                shared: dict[str, Tensor], rest: dict, n_inputs: int) -> Tensor:
        """``shared``: the pass context's inputs every member reads (the step, ``live``)."""
        skeleton, run = self.dispatch.model, self.dispatch.run

        def member(p: dict, b: dict, t: dict, g: Tensor, k: Tensor) -> Tensor:
            return run(program, _unstack_batch(t, rest, n_inputs), {"prepared": {}, "key": k, **shared},
                       lambda *inputs: functional_call(skeleton, (p, b), inputs), g)[0]

        return vmap(member)(params, buffers, tensors, gates, keys)  # [member, batch, pos, d_out]

    def _loss(self, params, program: Program, buffers, tensors, gates: Tensor, keys: Tensor, shared: dict,
              rest: dict, n_inputs: int, alive: Tensor):
        losses = _member_losses(self._logits(program, params, buffers, tensors, gates, keys, shared, rest, n_inputs),
                                tensors["targets"])
        return torch.where(alive, losses, losses.new_zeros(())).sum(), losses

    def _grads(self, program: Program, params, buffers, tensors, gates: Tensor, keys: Tensor, shared: dict,
               rest: dict, n_inputs: int, alive: Tensor):
        grads, (_, losses) = grad_and_value(self._loss, has_aux=True)(params, program, buffers, tensors, gates,
                                                                      keys, shared, rest, n_inputs, alive)
        return [grads[n] for n in self.names], losses


def train_ensemble(protocols: Sequence[Protocol], outs: Sequence[str | Path], *, progress: bool = False,
                   stop_after: int | None = None) -> list[dict]:
    """Train (or resume) packable ``protocols`` into ``outs`` as one ensemble. Returns each
    member's summary, or the :class:`RunFailed` that stopped it (a member that diverges stops
    alone; its run directory says so, as a solo run's would). ``stop_after`` ends early after
    that step's evals/checkpoints, as a kill would (tests)."""
    from tqdm.auto import tqdm

    _check_packable(protocols, outs)
    ens = _Ensemble(protocols, outs)
    step, total, t0 = ens.step, ens.total, protocols[0].train
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", desc=f"ensemble of {len(protocols)}")
    try:
        with numerics(ens.device, t0.precision, t0.deterministic, t0.flush_denormals):
            while any(ens.alive):
                ens.bookkeeping(step)
                if step >= total or (stop_after is not None and step >= stop_after) or not any(ens.alive):
                    break
                ens.train_step(step)
                step += 1
                bar.update(1)
    except KeyboardInterrupt:
        ens.interrupted(step)
        raise
    except OSError as e:  # the disk the members write to is full (or gone read-only): each says why
        stopped = ens.cannot_write(step, e)
        if stopped is not None:
            raise stopped from None
        raise
    except BaseException:
        ens.release()
        raise
    finally:
        bar.close()
    return ens.results(step)


def _check_packable(protocols: Sequence[Protocol], outs: Sequence[str | Path]) -> None:
    if len({pack_key(p) for p in protocols}) != 1:
        raise ValueError("ensemble members must share everything but their name, seeds and clamps")
    for p in protocols:
        reason = why_not_packable(p)
        if reason is not None:
            raise ValueError(f"{p.name} cannot run in an ensemble: {reason}")
    if not resumable_together(outs):
        raise ValueError("ensemble members must resume from the same checkpoint step")


def _member_forwards(protocols: Sequence[Protocol], task, cfg, device: torch.device,
                     compiled: bool) -> tuple[Conditions, list[Forward]]:
    """The members' conditions (one Forward per distinct clamp list) and each member's eval Forward."""
    index: dict[str, int] = {}
    of_member = [index.setdefault(condition_key(p), len(index)) for p in protocols]
    # one Forward per condition: its clamp plan, and its members' evals
    forwards = [make_forward(protocols[of_member.index(k)], task, cfg, device, compiled=compiled)
                for k in range(len(index))]
    conditions = Conditions([f.inner if isinstance(f, CompiledForward) else f for f in forwards], of_member, device)
    evals = [_MemberEval(forwards[k], (p.seeds.init, p.seeds.data)) for p, k in zip(protocols, of_member)]
    if compiled and len(forwards) > 1:  # one compiled eval graph for all conditions
        union = CompiledForward(conditions)
        evals = [_MemberEval(union, (p.seeds.init, p.seeds.data), conditions.gate(k))
                 for p, k in zip(protocols, of_member)]
    return conditions, evals


def _release_on_error(books: list[RunBook], fn):
    """``fn()``'s value; if it raises, every member's directory is released first."""
    try:
        return fn()
    except BaseException:
        for b in books:
            b.release()
        raise


class _Ensemble:
    """An ensemble's state: the members' RunBooks, solo models and optimizers (for evals and
    checkpoints), the stacked parameters and their optimizer, and who is still training."""

    def __init__(self, protocols: Sequence[Protocol], outs: Sequence[str | Path]) -> None:
        self.protocols = protocols
        p0 = protocols[0]
        task = make_task(p0.task)
        cfg = p0.model_config_for(task)
        self.device = device = resolve_device(p0.train.device)
        compiled = decide_compile(p0.train, device, members=len(protocols))  # on the packed job's work
        source = train_data(p0, task)  # members share the schedule (pack_key): each draws with its data seed
        conditions, evals = _member_forwards(protocols, task, cfg, device, compiled)
        self.books: list[RunBook] = []

        def open_books() -> None:  # one member's directory refused: the others' are released
            for p, o, e in zip(protocols, outs, evals):
                self.books.append(RunBook(p, o, task, cfg, e, device, data=source, compiled=compiled))

        _release_on_error(self.books, open_books)
        self.models = [build_model(cfg, p.seeds.init).to(device) for p in protocols]  # initialised on the CPU
        self.shared = build_model(cfg, p0.seeds.init).to(device)  # evaluated with each member's weights in turn
        self.optimizers = [make_optimizer(p, m) for p, m in zip(protocols, self.models)]
        self.step: int = _release_on_error(self.books, self._start)
        self.total, bs = self.books[0].total, self.books[0].bs
        self._stack(p0, conditions, compiled)
        self.draw = Batches(source, [p.seeds.data for p in protocols], bs, self.total, device=device)
        self.cast = autocast(device, p0.train.precision)
        self.alive = [True] * len(protocols)
        self.failed: dict[int, RunFailed] = {}
        self.ended: dict[int, dict] = {}  # members stopped at their answer (train.stop): finished at their own step

    def _start(self) -> int:
        """Every member loaded (resumed) and started; the step they start at."""
        members = list(zip(self.books, self.models, self.optimizers))
        for b, m, o in members:
            b.load(m, o)  # every member's refusals before any member's directory is written
        return {b.start(m, o) for b, m, o in members}.pop()

    def _stack(self, p0: Protocol, conditions: Conditions, compiled: bool) -> None:
        """The members' parameters and buffers stacked (a leading member axis), their Adam state,
        and the step that trains them."""
        models = self.models
        self.names = names = [n for n, _ in models[0].named_parameters()]
        self.params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(True)
                       for n in names}
        self.buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models])
                        for n, _ in models[0].named_buffers()}
        self.optimizer = make_optimizer(p0, _Params(self.params))
        _load_moments(self.optimizer, self.params, models, self.optimizers)
        skeleton = copy.deepcopy(models[0]).to("meta")
        self.update = _Step(skeleton, conditions, names, compiled, self.device)
        self.plain = plain_adam(p0)
        if self.plain:
            ensure_state(self.optimizer)
        if compiled:
            fresh_caches()

    def guard(self, i: int, fn, *args) -> None:
        """Run a member's bookkeeping; a member that diverges stops, the others go on."""
        try:
            fn(*args)
        except RunFailed as e:
            self.alive[i], self.failed[i] = False, e

    def bookkeeping(self, step: int) -> None:
        """Each live member's evals and checkpoints due at ``step``, on its solo model; a member
        whose stop rule answers finishes here."""
        alive = self.alive
        if not any(b.busy(step) for b, a in zip(self.books, alive) if a):
            return
        _sync_members(self.params, self.optimizer, self.models, self.optimizers)
        for i, (b, m, o) in enumerate(zip(self.books, self.models, self.optimizers)):
            if alive[i]:
                with torch.no_grad():
                    for mine, theirs in zip(self.shared.parameters(), m.parameters()):
                        mine.copy_(theirs)
                self.guard(i, b.at_step, step, m, o, self.shared)
                if alive[i] and b.stop_reason is not None and step < self.total:
                    alive[i], self.ended[i] = False, b.finish(step)

    def train_step(self, step: int) -> None:
        """One update of every member: the vmapped step, each member's loss checked and logged."""
        alive, books, device = self.alive, self.books, self.device
        if self.draw.device is not None:  # the counter stream: drawn stacked, on the device
            tensors, rest, n_inputs = _stacked_fields(self.draw.stacked(step))
        else:
            tensors, rest, n_inputs = to_device(_stack_batches(self.draw(step)), device)  # one move per step
        keys = torch.stack([call_key(p.seeds.init, p.seeds.data, step, True) for p in self.protocols]).to(device)
        with self.cast:
            grads, losses = self.update(step, self.params, self.buffers, tensors, keys, rest, n_inputs,
                                        torch.tensor(alive, device=device))
        finite = torch.isfinite(losses).tolist()  # one check of every member (one sync on a GPU)
        for i, b in enumerate(books):
            if alive[i] and not finite[i]:
                self.guard(i, b.check_loss, step, losses[i])
        # a stopped member contributes nothing, and its NaNs reach no other member (members'
        # slices never mix); its gradient is zeroed too (0 x NaN is NaN)
        if any(alive):
            dead = [i for i, a in enumerate(alive) if not a]
            if dead:
                for g in grads:
                    if g is not None:
                        g[dead] = 0
            skip = self.update.unused(step, self.params, self.buffers, tensors, keys, rest, n_inputs)
            _adam(self.optimizer, self.params, grads, skip, self.plain)
        for i, b in enumerate(books):
            if alive[i]:
                b.add_loss(losses[i])

    def interrupted(self, step: int) -> None:
        for i, b in enumerate(self.books):
            if self.alive[i]:
                b.interrupted(step)

    def cannot_write(self, step: int, error: OSError) -> RunFailed | None:
        """Each live member says why it stopped; every directory is released. The RunFailed to raise, if any."""
        stopped: RunFailed | None = None
        for i, b in enumerate(self.books):
            try:
                if self.alive[i]:
                    b.cannot_write(step, error)
            except RunFailed as r:
                stopped = r
        self.release()
        return stopped

    def release(self) -> None:
        for b in self.books:
            b.release()

    def results(self, step: int) -> list:
        return [self.failed[i] if i in self.failed else self.ended[i] if i in self.ended else b.finish(step)
                for i, b in enumerate(self.books)]


def _adam(optimizer: torch.optim.Optimizer, params: dict[str, Tensor], grads: list[Tensor | None],
          skip: dict[str, list[int]], plain: bool) -> None:
    """Adam on the stacked parameters as each member's solo run would take it. A parameter no
    member's loss depends on is skipped, as torch skips a parameter without a gradient. Members
    whose loss does not depend on a parameter that others' does keep their slice of it and of
    its Adam moments. (Adam's step count is one per stacked parameter, so it counts such steps
    for them: were a member to depend on the parameter again later, as after a layer clamp's
    window, its bias correction would differ from its solo run's.)"""
    S = next(iter(params.values())).shape[0]
    take = [g is not None and len(skip.get(n, ())) < S for n, g in zip(params, grads)]
    kept = []
    for n, p in params.items():
        members = skip.get(n)
        if members and len(members) < S:
            state = optimizer.state.get(p, {})
            kept.append((p, members, p.detach()[members].clone(),
                         {k: v[members].clone() for k, v in state.items() if k != "step"}))
    if plain:
        adam_(optimizer, [p for p, t in zip(params.values(), take) if t], [g for g, t in zip(grads, take) if t])
    else:
        for p, g, t in zip(params.values(), grads, take):
            p.grad = g if t else None
        optimizer.step()
    with torch.no_grad():
        for p, members, value, moments in kept:
            p[members] = value
            for k, v in moments.items():
                optimizer.state[p][k][members] = v


class _Params(nn.Module):
    """The stacked tensors as the ``parameters()`` that :func:`make_optimizer` expects."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        super().__init__()
        self._list = list(params.values())

    def parameters(self, recurse: bool = True):
        return iter(self._list)


def _load_moments(optimizer: torch.optim.Optimizer, params: dict[str, Tensor], models, optimizers) -> None:
    """Stack the members' Adam state (present when they resumed from a checkpoint)."""
    for name, stacked in params.items():
        states = [o.state.get(dict(m.named_parameters())[name], {}) for m, o in zip(models, optimizers)]
        if not states[0]:
            continue
        optimizer.state[stacked] = {k: (torch.stack([s[k] for s in states]) if k != "step" else states[0][k].clone())
                                    for k in states[0]}


@torch.no_grad()
def _sync_members(params: dict[str, Tensor], optimizer: torch.optim.Optimizer, models, optimizers) -> None:
    """Copy each member's slice of the stacked weights and Adam state into its solo model and
    optimizer, which its RunBook evaluates and checkpoints."""
    for i, (m, o) in enumerate(zip(models, optimizers)):
        own = dict(m.named_parameters())
        for name, stacked in params.items():
            own[name].copy_(stacked[i])
            state = optimizer.state.get(stacked)
            if state:
                o.state[own[name]] = {k: (v[i].clone() if k != "step" else v.clone()) for k, v in state.items()}
