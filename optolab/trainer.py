"""The training loop: Adam on a task's batches, evaluations and checkpoints on schedules.

Rules:
- The loop knows nothing of interventions: every forward pass goes through a ``Forward``
  (:mod:`optolab.forward`); the loss and the optimizer step happen here, after it returns.
- ``step`` counts optimizer steps; ``sequences = step × batch_size``. An evaluation "at step s"
  sees the model after s updates; step 0 is the initial model.
- Determinism: the model is initialised from ``seeds.init``; the batch of step t depends only on
  ``(seeds.data, t)``; eval sets only on ``seeds.eval``. So resuming from the checkpoint at step
  t continues exactly as the uninterrupted run did.
- No process-wide setting is changed (thread counts are the caller's: the CLI sets one thread).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from optolab.checkpoint import list_checkpoints, load_checkpoint, prune, save_checkpoint
from optolab.errors import OptolabError, RunFailed
from optolab.forward import Forward, make_forward
from optolab.measures.evaluate import EvalSet, evaluate
from optolab.model import Transformer, build_model
from optolab.protocol import Protocol
from optolab.rundir import RunDir, environment
from optolab.summary import summarize
from optolab.tasks import IGNORE, Task, make_task


@dataclass
class TrainResult:
    run_dir: RunDir
    model: Transformer
    task: Task
    summary: dict


def make_optimizer(protocol: Protocol, model: Transformer) -> torch.optim.Optimizer:
    t = protocol.train
    return torch.optim.Adam(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps,
                            weight_decay=t.weight_decay, fused=t.fused or None)


def train(protocol: Protocol, out: str | Path, *, forward: Forward | None = None,
          progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) ``protocol`` into run directory ``out``.

    ``stop_after`` ends the loop early after that step's checkpoint/eval, as a kill would
    (used by tests of resumption); the run is then left unfinished.
    """
    run = RunDir(out)
    resolved = protocol.resolved()
    _check_same_protocol(run, resolved)
    run.write_protocol(resolved)

    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    forward = forward or make_forward(protocol, task, cfg)
    model = build_model(cfg, protocol.seeds.init)
    optimizer = make_optimizer(protocol, model)
    evals = EvalSet.build(task, protocol.measures, protocol.seeds.eval, cfg.n_ctx)

    total = protocol.train.total_steps
    bs = protocol.train.batch_size
    eval_steps = set(protocol.eval_steps())
    ckpt_steps = set(protocol.checkpoint_steps())

    meta = run.read_json(run.meta) or {**environment(), "seeds": protocol.seeds.model_dump(),
                                       "wall_time_s": 0.0, "segments": []}
    start = 0
    loss_sum, loss_n = torch.zeros(()), 0  # training loss since the last eval
    done = list_checkpoints(run.checkpoints)
    if done:
        start = done[-1]
        sidecar = load_checkpoint(run.checkpoints, start, model, optimizer)
        run.truncate_metrics(start)
        loss_sum, loss_n = torch.tensor(sidecar.get("train_loss_sum", 0.0)), sidecar.get("train_loss_n", 0)
    else:
        run.truncate_metrics(-1)  # a run that died before its first checkpoint starts clean
    meta.update(status="running", model_config=cfg.to_dict(),
                n_params=sum(p.numel() for p in model.parameters()))
    meta["segments"].append({"resumed_from_step": start, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    run.write_json(run.meta, meta)

    t0 = time.perf_counter()
    eval_time = 0.0
    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
               desc=protocol.name, mininterval=0.5)
    model.train()
    step = start
    # Tiny gradients and Adam moments (e.g. a run that does not learn) turn into denormals,
    # which are ~3x slower on CPU (measured): flush them to zero for the run, then restore
    # torch's default. Recorded in the protocol (train.flush_denormals), so runs stay exact.
    torch.set_flush_denormal(protocol.train.flush_denormals)
    try:
        while True:
            if step in eval_steps and not (step == start and done):
                te = time.perf_counter()
                rows = evaluate(model, task, protocol.measures, evals, forward, step)
                if loss_n:
                    rows.append({"split": "train_batches", "metric": "loss", "layer": None, "head": None,
                                 "value": loss_sum.item() / loss_n})
                    loss_sum, loss_n = torch.zeros(()), 0
                run.append_metrics([{"step": step, "sequences": step * bs, **r} for r in rows])
                eval_time += time.perf_counter() - te
                main_loss = next(r["value"] for r in rows if r["split"] == task.main_split and r["metric"] == "loss")
                if not math.isfinite(main_loss):
                    _diverged(run, meta, protocol, task, step, f"the {task.main_split} eval loss is {main_loss}")
                bar.set_postfix({f"{task.main_split} loss": f"{main_loss:.3f}"}, refresh=False)
            if step in ckpt_steps and not (step == start and done):
                bad = _non_finite_parameter(model)
                if bad is not None:  # never checkpoint a broken model: the last good one stays the last
                    _diverged(run, meta, protocol, task, step, f"parameter {bad} is not finite")
                save_checkpoint(run.checkpoints, step, step * bs, model, optimizer,
                                {"name": protocol.name, "train_loss_sum": loss_sum.item(), "train_loss_n": loss_n})
                prune(run.checkpoints, protocol.train.checkpoints.keep, protect={total})
            if step >= total or (stop_after is not None and step >= stop_after):
                break

            batch = task.train_batch(protocol.seeds.data, step, bs)
            logits, _ = forward(model, batch, step=step, training=True)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
            if not torch.isfinite(loss):  # one scalar check per step; caught before the update
                _diverged(run, meta, protocol, task, step, f"the training loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            forward.after_backward(model, step)
            if protocol.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), protocol.train.grad_clip)
            optimizer.step()
            forward.after_update(model, step)
            loss_sum += loss.detach()
            loss_n += 1
            step += 1
            bar.update(1)
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
        meta["segments"][-1]["ended_at_step"] = step
        run.write_json(run.meta, meta)
        raise
    finally:
        bar.close()
        torch.set_flush_denormal(False)

    wall = time.perf_counter() - t0
    meta["wall_time_s"] = meta.get("wall_time_s", 0.0) + wall
    meta["segments"][-1].update(wall_time_s=wall, eval_time_s=eval_time, ended_at_step=step)
    finished = step >= total
    summary = {}
    if finished:
        run.write_parquet()
        summary = summarize(run.metrics(), task, protocol)
        run.write_json(run.summary, summary)
        meta["status"] = "finished"
    else:
        meta["status"] = "stopped"
    run.write_json(run.meta, meta)
    return TrainResult(run, model, task, summary)


def _non_finite_parameter(model: torch.nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def _diverged(run: RunDir, meta: dict, protocol: Protocol, task: Task, step: int, what: str) -> None:
    """Stop a diverged run: metrics so far kept (and written to parquet), checkpoints untouched,
    ``summary.json`` and ``meta.json`` marked failed; raises :class:`RunFailed`."""
    last = list_checkpoints(run.checkpoints)
    last_good = last[-1] if last else None
    meta.update(status="failed", failure=f"{what} at step {step}")
    meta["segments"][-1]["ended_at_step"] = step
    run.write_json(run.meta, meta)
    run.write_parquet()
    run.write_json(run.summary, {
        "name": protocol.name, "status": "failed", "main_split": task.main_split,
        "failure": {"step": step, "sequences": step * protocol.train.batch_size, "what": what},
        "last_checkpoint_step": last_good})
    raise RunFailed(f"the run diverged: {what} at step {step}. It is marked failed in summary.json; "
                    f"metrics so far and checkpoints up to step {last_good} are kept.",
                    field="train.lr", fix="lower train.lr or set train.grad_clip, then run with --overwrite.")


def _check_same_protocol(run: RunDir, resolved: dict) -> None:
    """Refuse to mix two protocols in one run directory (and so to lose anything written)."""
    if not run.protocol.is_file():
        if run.path.is_dir() and any(run.path.iterdir()):
            raise OptolabError(f"'{run.path}' exists and is not an optolab run directory.", field="--out",
                               fix="choose an empty or new folder.")
        return
    existing = yaml.safe_load(run.protocol.read_text())
    if existing != resolved:
        changed = sorted(k for k in set(existing) | set(resolved) if existing.get(k) != resolved.get(k))
        raise OptolabError(
            f"'{run.path}' holds a run of a different protocol (sections differ: {', '.join(changed)}).",
            field="--out", fix="pass another --out, or --overwrite to discard that run.")
    if (run.path / "summary.json").is_file():
        if json.loads((run.path / "summary.json").read_text()).get("status") == "failed":
            raise OptolabError(f"'{run.path}' holds a run of this protocol that diverged (see its summary.json).",
                               field="--out", fix="change train.lr or train.grad_clip and use another --out, "
                               "or pass --overwrite to redo it.")
        raise OptolabError(f"'{run.path}' already holds a finished run of this protocol.", field="--out",
                           fix="open it with `optolab plot` / optolab.open_run, or pass --overwrite to redo it.")
