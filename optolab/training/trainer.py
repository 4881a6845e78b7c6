"""The training loop: Adam on a task's batches; evaluations, checkpoints and the run's files
are kept by a :class:`~optolab.training.runbook.RunBook`.

Rules:
- The loop knows nothing of interventions: every forward pass goes through a ``Forward``
  (:mod:`optolab.model.forward`); the loss and the optimizer step happen here, after it returns
  (:func:`make_update`; for ``train.compile`` the forward and backward are one compiled graph,
  :mod:`optolab.training.compiled_step`).
- ``step`` counts optimizer steps; ``sequences = step × batch_size``. An evaluation "at step s"
  sees the model after s updates; step 0 is the initial model.
- Determinism: the model is initialised from ``seeds.init``; the batch of step t depends only on
  ``(seeds.data, t)`` (and the protocol's ``data`` schedule, which picks the task or mixture that
  draws it: :mod:`optolab.protocol.data_schedule`); eval sets only on ``seeds.eval`` and the
  protocol's ``task``. So resuming from the checkpoint at step t continues exactly as the
  uninterrupted run did.
- Devices (:mod:`optolab.core.device`): the model is initialised on the CPU and moved to
  ``train.device``; each step's batch is generated on the CPU and moved. The forward passes run
  under the protocol's precision (:func:`~optolab.core.device.autocast`).
- No process-wide setting is changed for longer than the run (thread counts are the caller's:
  the CLI sets one thread; :func:`~optolab.core.device.numerics` restores what it sets), except
  that a compiled run starts from cleared torch.compile caches with a higher recompile limit
  (:func:`optolab.training.compiled.fresh_caches` says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from optolab.core.device import autocast, decide_compile, numerics, resolve_device
from optolab.model.forward import Forward
from optolab.model.transformer import Transformer, build_model
from optolab.protocol.data_schedule import train_data
from optolab.protocol.schema import Protocol
from optolab.tasks import IGNORE, Task, make_task
from optolab.tasks.base import Batch, unstacked
from optolab.training.batches import Batches
from optolab.training.compiled import CompiledForward, fresh_caches, require_compiler
from optolab.training.compiled_step import CompiledStep
from optolab.training.runbook import RunBook, eager_forward
from optolab.training.rundir import RunDir


@dataclass
class TrainResult:
    run_dir: RunDir
    model: Transformer
    task: Task
    summary: dict


def make_forward(protocol, task, cfg, device: torch.device | None = None, *, compiled: bool | None = None) -> Forward:
    """The Forward a protocol needs on ``device`` (default: the protocol's ``train.device``):
    plain without clamps, else the clamp engine with the protocol's clamp plan (made once per
    protocol: :meth:`~optolab.protocol.schema.Protocol.clamp_plan`, moved to the device); when
    the run compiles (:func:`~optolab.core.device.decide_compile`, or ``compiled``: a few
    calls on a finished run never repay a compile) every call goes through
    :class:`optolab.training.compiled.CompiledForward`."""
    device = resolve_device(protocol.train.device) if device is None else device
    forward = eager_forward(protocol, task, cfg, device)
    if decide_compile(protocol.train, device) if compiled is None else compiled:
        require_compiler(device)
        forward = CompiledForward(forward)
    return forward


def make_optimizer(protocol: Protocol, model: Transformer) -> torch.optim.Optimizer:
    t = protocol.train
    return torch.optim.Adam(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps,
                            weight_decay=t.weight_decay, fused=t.fused or None)


def make_update(protocol: Protocol, forward: Forward, model: Transformer,
                optimizer: torch.optim.Optimizer) -> Callable[[Batch, int], torch.Tensor]:
    """One training step, ``update(batch, step) -> loss``; the parameters are updated only when
    the loss is finite (the caller then stops the run). Planned runs take
    :class:`~optolab.training.compiled_step.CompiledStep` (forward and backward in one graph)."""
    if isinstance(forward, CompiledForward):
        return CompiledStep(protocol, forward, model, optimizer)

    def update(batch: Batch, step: int) -> torch.Tensor:
        logits, _ = forward(model, batch, step=step, training=True)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
        if not math.isfinite(loss.item()):
            return loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        forward.after_backward(model, step)
        if protocol.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), protocol.train.grad_clip)
        optimizer.step()
        forward.after_update(model, step)
        return loss

    return update


def train(protocol: Protocol, out: str | Path, *, forward: Forward | None = None,
          progress: bool = True, stop_after: int | None = None, overwrite: bool = False) -> TrainResult:
    """Train (or resume) ``protocol`` into run directory ``out``, on ``train.device``;
    ``overwrite`` first discards the run ``out`` holds (only a run's own files:
    :meth:`~optolab.training.rundir.RunDir.clear`). Every check that can refuse the run is made
    before ``out`` is created or changed (:class:`~optolab.training.runbook.RunBook`).

    ``stop_after`` ends the loop early after that step's checkpoint/eval, as a kill would
    (used by tests of resumption); the run is then left unfinished.
    """
    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    t = protocol.train
    device = resolve_device(t.device)
    owned = forward is None  # a Forward the caller passed is the caller's to close
    forward = forward or make_forward(protocol, task, cfg, device)
    if isinstance(forward, CompiledForward):
        fresh_caches()
    source = train_data(protocol, task)  # the task itself, or the data schedule's batches
    book = RunBook(protocol, out, task, cfg, forward, device, data=source, overwrite=overwrite,
                   compiled=isinstance(forward, CompiledForward))
    model = build_model(cfg, protocol.seeds.init).to(device)  # initialised on the CPU: the same weights everywhere
    optimizer = make_optimizer(protocol, model)
    total, bs = book.total, book.bs
    try:
        step = start = book.start(model, optimizer)
        update = make_update(protocol, forward, model, optimizer)  # after start: it holds the optimizer's state
    except BaseException:
        book.release()
        raise

    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
               desc=protocol.name, mininterval=0.5)
    model.train()
    # the counter stream draws on a GPU itself (on the CPU the draws ahead are the same numbers)
    draw = Batches(source, [protocol.seeds.data], bs, total, device=None if device.type == "cpu" else device)
    cast = autocast(device, t.precision)
    try:
        with numerics(device, t.precision, t.deterministic, t.flush_denormals):
            while True:
                if book.at_step(step, model, optimizer):
                    bar.set_postfix({f"{task.main_split} loss": f"{book.last_loss:.3f}"}, refresh=False)
                if book.done(step) or (stop_after is not None and step >= stop_after):
                    break
                batch = unstacked(draw.stacked(step), 0) if draw.device is not None else draw(step)[0].to_device(device)
                with cast:
                    loss = update(batch, step)
                book.check_loss(step, loss)
                book.add_loss(loss)
                step += 1
                bar.update(1)
    except KeyboardInterrupt:
        book.interrupted(step)
        raise
    except OSError as e:  # the run directory cannot be written: stop with what is saved
        book.cannot_write(step, e)
    except BaseException:
        book.release()  # a failed run leaves its directory to the next writer
        raise
    finally:
        bar.close()
        if owned:
            forward.close()  # the model leaves with no hooks attached
    summary = book.finish(step)
    return TrainResult(book.run, model, task, summary)
