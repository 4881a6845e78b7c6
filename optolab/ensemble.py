"""Seed ensembles: runs of one protocol that differ only in their seeds, trained together as one
batched model with a leading member axis.

Rules:
- Runs pack together when their resolved protocols are equal except ``name`` and the seeds
  (:func:`pack_key`), and no clamp or setting couples parameters across the update
  (:func:`why_not_packable`: ``freeze`` and ``graft`` clamps, ``train.grad_clip``). Each member
  keeps its own run directory, written by its own :class:`~optolab.runbook.RunBook`, exactly as
  if it had run alone.
- Training: each member draws its own batch (``task.train_batch(seeds.data, step, …)``, the
  solo run's data); the forward pass is ``torch.func.vmap`` over members of the model's own
  ``forward`` with the member's parameters (``functional_call``), so every op runs once for all
  members. Clamps act inside through the clamp engine's hook backend: the same compiled plan, the
  same ops, per member. The loss is each member's mean, summed: members share no parameter, so
  each gets exactly its own gradient; Adam is elementwise, so the stacked update is each
  member's own.
- With ``train.compile`` the vmapped forward, all passes of the step's clamp program included,
  the losses and the gradient are one compiled graph per program (:class:`_CompiledStep`, as
  :mod:`optolab.compiled_step` does for a solo run), and fused Adam is called directly.
- Evals and checkpoints: at those steps a member's weights and Adam state are copied into a solo
  model and optimizer, which its RunBook checkpoints; evals run on one model shared by all
  members (loaded with each member's weights in turn) through one protocol Forward, nnsight or
  compiled as a solo run's would, so compiled eval graphs are built once per ensemble, not per
  member. Resuming reads the members' checkpoints back.
- Numbers equal the solo run's up to float summation order in batched matrix products; the
  tolerance is stated and tested in ``tests/test_ensemble.py`` (and ``tests/test_compiled.py``
  for compiled ensembles).
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

from optolab.checkpoint import list_checkpoints
from optolab.clamps.engine import ClampForward, Program
from optolab.compiled import (
    NO_CLAMPS,
    STEP_OPTIONS,
    CallKeys,
    CompiledForward,
    SiteDispatch,
    compile_fn,
    fresh_caches,
)
from optolab.compiled_step import adam_, ensure_state, plain_adam
from optolab.errors import RunFailed
from optolab.forward import Forward, PlainForward, make_forward
from optolab.model import PLAIN_KERNELS, build_model
from optolab.protocol import Protocol
from optolab.runbook import RunBook
from optolab.tasks import IGNORE, make_task
from optolab.tasks.base import Batch
from optolab.trainer import make_optimizer

UNPACKABLE_CLAMPS = {"freeze": "a freeze clamp rewrites parameters between steps",
                     "graft": "a graft clamp runs a second model"}


def pack_key(protocol: Protocol) -> str:
    """Runs with equal keys can share an ensemble: everything but the name and seeds agrees."""
    data = protocol.resolved()
    data.pop("name", None)
    data["seeds"] = {k: v for k, v in data["seeds"].items() if k not in ("init", "data")}
    return json.dumps(data, sort_keys=True, default=str)


def why_not_packable(protocol: Protocol) -> str | None:
    for c in protocol.clamps:
        if c.kind in UNPACKABLE_CLAMPS:
            return UNPACKABLE_CLAMPS[c.kind]
    if protocol.train.grad_clip is not None:
        return "train.grad_clip takes a norm over all parameters"
    return None


def resumable_together(outs: Sequence[str | Path]) -> bool:
    """Members resume together only from the same checkpoint step (or all from scratch)."""
    last = {(list_checkpoints(Path(o) / "checkpoints") or [None])[-1] for o in outs}
    return len(last) == 1


class _Member(nn.Module):
    """One member as the clamp engine sees a model: the shared skeleton's modules (where hooks
    go) and a call that runs the skeleton with this member's parameters."""

    def __init__(self, skeleton: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_skeleton", skeleton)  # not a submodule: names stay unprefixed
        object.__setattr__(self, "_state", (params, buffers))

    def named_modules(self, *args, **kwargs):
        return self._skeleton.named_modules(*args, **kwargs)

    def forward(self, *inputs: Tensor) -> Tensor:
        return functional_call(self._skeleton, self._state, inputs)


def _batch_fields(batch: Batch) -> tuple[dict[str, Tensor], dict]:
    tensors = {k: v for k, v in vars(batch).items() if isinstance(v, Tensor)}
    tensors.update({f"inputs.{i}": t for i, t in enumerate(batch.inputs)})
    rest = {k: v for k, v in vars(batch).items() if k not in tensors and k != "inputs"}
    return tensors, rest


def _stack_batches(batches: list[Batch]) -> tuple[dict[str, Tensor], dict, int]:
    fields = [_batch_fields(b)[0] for b in batches]
    return {k: torch.stack([f[k] for f in fields]) for k in fields[0]}, _batch_fields(batches[0])[1], \
        len(batches[0].inputs)


def _unstack_batch(tensors: dict[str, Tensor], rest: dict, n_inputs: int) -> Batch:
    inputs = tuple(tensors[f"inputs.{i}"] for i in range(n_inputs))
    kwargs = {k: v for k, v in tensors.items() if not k.startswith("inputs.")}
    return Batch(inputs=inputs, **kwargs, **rest)


def _train_forward(protocol: Protocol, task, cfg) -> Forward:
    """The protocol's clamps with the hook backend (nnsight traces do not run under vmap)."""
    forward = make_forward(protocol, task, cfg)
    if isinstance(forward, CompiledForward):
        forward = forward.inner
    if not isinstance(forward, PlainForward):
        forward.backend = "hooks"
    return forward


def _member_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Each member's mean loss: ``logits [member, batch, pos, d_out]`` -> ``[member]``."""
    S = logits.shape[0]
    per_token = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE,
                                reduction="none").view(S, -1)
    return per_token.sum(1) / (targets != IGNORE).view(S, -1).sum(1)


class _CompiledStep:
    """``train.compile``: the vmapped members' forward (every pass of the step's clamp program),
    their losses and the gradient as one compiled graph per program (see
    :mod:`optolab.compiled_step`; sites act through a :class:`~optolab.compiled.SiteDispatch` on
    the shared skeleton). Returns the stacked parameters' gradients and each member's loss."""

    def __init__(self, skeleton: nn.Module, forward: Forward, names: list[str]) -> None:
        self.forward, self.names = forward, names
        self.dispatch = SiteDispatch(skeleton)
        self.compiled = compile_fn(self._grads, STEP_OPTIONS)
        self.keys = CallKeys()

    def __call__(self, step: int, params, buffers, tensors, rest: dict, n_inputs: int,
                 alive: Tensor) -> tuple[list[Tensor], Tensor]:
        program = NO_CLAMPS
        if isinstance(self.forward, ClampForward):
            program = self.forward.prepare(self.dispatch.model, None, step, True)[0] or NO_CLAMPS
        params = {n: p.detach() for n, p in params.items()}
        self.dispatch.warm(program, tuple(t.shape for t in tensors.values()),
                           lambda: self._logits(program, params, buffers, tensors, rest, n_inputs))
        with self.keys.guards(program, tensors, rest, n_inputs):
            return self.compiled(program, params, buffers, tensors, rest, n_inputs, alive)

    def _logits(self, program: Program, params, buffers, tensors, rest: dict, n_inputs: int) -> Tensor:
        skeleton, run = self.dispatch.model, self.dispatch.run

        def member(p: dict, b: dict, t: dict) -> Tensor:
            return run(program, _unstack_batch(t, rest, n_inputs), {},
                       lambda *inputs: functional_call(skeleton, (p, b), inputs))[0]

        return vmap(member)(params, buffers, tensors)

    def _loss(self, params, program: Program, buffers, tensors, rest: dict, n_inputs: int, alive: Tensor):
        losses = _member_losses(self._logits(program, params, buffers, tensors, rest, n_inputs), tensors["targets"])
        return torch.where(alive, losses, torch.zeros(())).sum(), losses

    def _grads(self, program: Program, params, buffers, tensors, rest: dict, n_inputs: int, alive: Tensor):
        grads, (_, losses) = grad_and_value(self._loss, has_aux=True)(params, program, buffers, tensors, rest,
                                                                      n_inputs, alive)
        return [grads[n] for n in self.names], losses


def train_ensemble(protocols: Sequence[Protocol], outs: Sequence[str | Path], *, progress: bool = False,
                   stop_after: int | None = None) -> list[dict]:
    """Train (or resume) packable ``protocols`` into ``outs`` as one ensemble. Returns each
    member's summary, or the :class:`RunFailed` that stopped it (a member that diverges stops
    alone; its run directory says so, as a solo run's would). ``stop_after`` ends early after
    that step's evals/checkpoints, as a kill would (tests)."""
    from tqdm.auto import tqdm

    keys = {pack_key(p) for p in protocols}
    if len(keys) != 1:
        raise ValueError("ensemble members must share everything but their name and seeds")
    reason = why_not_packable(protocols[0])
    if reason is not None:
        raise ValueError(f"this protocol cannot run in an ensemble: {reason}")
    if not resumable_together(outs):
        raise ValueError("ensemble members must resume from the same checkpoint step")
    p0 = protocols[0]
    task = make_task(p0.task)
    cfg = p0.model_config_for(task)
    evaluator = make_forward(p0, task, cfg)  # members' clamps are equal (pack_key): one Forward
    books = [RunBook(p, o, task, cfg, evaluator) for p, o in zip(protocols, outs)]
    models = [build_model(cfg, p.seeds.init) for p in protocols]
    shared = build_model(cfg, p0.seeds.init)  # evaluated with each member's weights in turn
    optimizers = [make_optimizer(p, m) for p, m in zip(protocols, models)]
    starts = {b.start(m, o) for b, m, o in zip(books, models, optimizers)}
    step = starts.pop()
    total, bs = books[0].total, books[0].bs

    names = [n for n, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(True)
              for n in names}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in models[0].named_buffers()}
    optimizer = make_optimizer(p0, _Params(params))
    _load_moments(optimizer, params, models, optimizers)
    skeleton = copy.deepcopy(models[0]).to("meta")
    forward = _train_forward(p0, task, cfg)
    compiled = _CompiledStep(skeleton, forward, names) if p0.train.compile else None
    plain = plain_adam(p0)
    if compiled is not None and plain:
        ensure_state(optimizer)
    if compiled is not None:
        fresh_caches()
    S = len(protocols)

    alive = [True] * S
    failed: dict[int, RunFailed] = {}

    def guard(i: int, fn, *args) -> None:
        """Run a member's bookkeeping; a member that diverges stops, the others go on."""
        try:
            fn(*args)
        except RunFailed as e:
            alive[i], failed[i] = False, e

    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", desc=f"ensemble of {S}")
    torch.set_flush_denormal(p0.train.flush_denormals)
    try:
        while any(alive):
            if any(b.busy(step) for b, a in zip(books, alive) if a):
                _sync_members(params, optimizer, models, optimizers)
                for i, (b, m, o) in enumerate(zip(books, models, optimizers)):
                    if alive[i]:
                        with torch.no_grad():
                            for mine, theirs in zip(shared.parameters(), m.parameters()):
                                mine.copy_(theirs)
                        guard(i, b.at_step, step, m, o, shared)
            if step >= total or (stop_after is not None and step >= stop_after) or not any(alive):
                break
            batches = [task.train_batch(p.seeds.data, step, bs) for p in protocols]
            tensors, rest, n_inputs = _stack_batches(batches)

            if compiled is not None:
                grads, losses = compiled(step, params, buffers, tensors, rest, n_inputs, torch.tensor(alive))
            else:
                def member(p: dict, b: dict, t: dict, step: int = step) -> Tensor:
                    logits, _ = forward(_Member(skeleton, p, b), _unstack_batch(t, rest, n_inputs),
                                        step=step, training=True)
                    return logits

                token = PLAIN_KERNELS.set(True)
                try:
                    logits = vmap(member)(params, buffers, tensors)  # [member, batch, pos, d_out]
                finally:
                    PLAIN_KERNELS.reset(token)
                losses = _member_losses(logits, tensors["targets"])
            for i, b in enumerate(books):
                if alive[i]:
                    guard(i, b.check_loss, step, losses[i])
            # a stopped member contributes nothing, and its NaNs reach no other member (members'
            # slices never mix); the compiled branch also zeroes its gradient (0 x NaN is NaN)
            if compiled is None:
                optimizer.zero_grad(set_to_none=True)
                torch.where(torch.tensor(alive), losses, torch.zeros(())).sum().backward()
                optimizer.step()
            elif any(alive):
                dead = [i for i, a in enumerate(alive) if not a]
                if dead:
                    for g in grads:
                        g[dead] = 0
                if plain:
                    adam_(optimizer, list(params.values()), grads)
                else:
                    for p, g in zip(params.values(), grads):
                        p.grad = g
                    optimizer.step()
            for i, b in enumerate(books):
                if alive[i]:
                    b.add_loss(losses[i])
            step += 1
            bar.update(1)
    except KeyboardInterrupt:
        for i, b in enumerate(books):
            if alive[i]:
                b.interrupted(step)
        raise
    finally:
        bar.close()
        torch.set_flush_denormal(False)
    return [failed[i] if i in failed else b.finish(step) for i, b in enumerate(books)]


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
