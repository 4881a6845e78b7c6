"""One run's bookkeeping around a training loop: its directory, schedules, evals, checkpoints,
divergence checks and summary — everything except the forward/backward/update itself.

Rules:
- A :class:`RunBook` owns one run directory. A refusal writes nothing: building one and
  ``load(model, optimizer)`` (the last checkpoint, or ``init_from``'s, into them) make every check
  that can refuse the run — the folder and its writer, the protocol it holds, the trackers'
  libraries, the checkpoint, the logs a resume cuts — and only read; ``start(model, optimizer)``
  then takes the folder's lock (checking again what another writer may have changed), clears it
  for ``overwrite``, writes, and returns the first step; ``at_step(step, …)`` runs
  the evals and checkpoints scheduled at that step; ``add_loss`` accumulates the training loss
  reported at the next eval; ``finish(step)`` writes parquet, ``summary.json`` and the status.
- The training loops (:mod:`optolab.training.trainer` for one run, :mod:`optolab.training.ensemble` for several
  packed into one batched model) call these in the same order, so a run's files do not depend
  on how it was trained.
- ``train.stop`` (:mod:`optolab.training.stopping`): after each eval the stop rule is fed the
  eval's rows; once it says stop, ``stop_reason`` is set, a checkpoint is saved at that step
  and the loop ends; ``finish`` then writes ``summary.json`` with ``status: stopped``. A stopped
  run opened again without the rule resumes from that checkpoint (:func:`~optolab.training.stopping.reopen`).
- A non-finite eval loss or parameter stops the run (:meth:`diverged`): metrics so far and the
  last good checkpoint are kept, ``summary.json`` and ``meta.json`` say ``failed``, and
  :class:`~optolab.core.errors.RunFailed` is raised. A broken model is never checkpointed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from optolab.clamps.engine import ClampForward
from optolab.core.device import autocast, decide_compile
from optolab.core.device import describe as describe_device
from optolab.core.errors import OptolabError, RunFailed
from optolab.core.lock import LOCK_NAME, DirLock, check_free
from optolab.measures.evaluate import EvalSet, evaluate
from optolab.measures.measure import CheckpointData
from optolab.measures.registry import at_checkpoints
from optolab.measures.trajectory import pca, speed
from optolab.model.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    load_weights,
    prune,
    save_checkpoint,
    stem,
)
from optolab.model.forward import Forward, PlainForward
from optolab.protocol.schema import Protocol
from optolab.tasks import Task
from optolab.training import per_example
from optolab.training.rundir import RunDir, environment
from optolab.training.stopping import StopRule, reopen, stopped_summary, was_stopped
from optolab.training.summary import summarize
from optolab.training.trackers import Trackers
from optolab.training.trackers import require as require_trackers


class RunBook:
    def __init__(self, protocol: Protocol, out: str | Path, task: Task, cfg, forward: Forward,
                 device: torch.device = torch.device("cpu"), data=None, *, overwrite: bool = False,
                 compiled: bool | None = None) -> None:
        """``data``: what the training loop draws its batches from (the task, or the protocol's
        data schedule: :func:`~optolab.protocol.data_schedule.train_data`; default: the task).
        Measures that run at checkpoints sample from it. ``overwrite``: discard what ``out``
        holds (only a run's own files: :meth:`RunDir.clear`) when the run starts. ``compiled``:
        whether its training steps compile, as ``meta.json`` records it (an ensemble decides on
        the packed job's work, not this run's; default: this run's own decision). Nothing is
        written here (the module rules)."""
        self.protocol, self.task, self.forward, self.device = protocol, task, forward, device
        self.compiled = decide_compile(protocol.train, device) if compiled is None else compiled
        self.run = RunDir(out)
        self.overwrite = overwrite
        self.lock: DirLock | None = None
        resolved = protocol.resolved()
        if _is_dir(self.run.path):
            check_free(self.run.path)  # another writer is refused first: what it writes is read below
        if overwrite and _is_dir(self.run.path):
            self.run.clearable()  # a folder that is not only a run's is refused, whole
        else:
            _refuse_foreign(self.run)  # nothing is written into a folder that is not a run
            _check_same_protocol(self.run, resolved)  # again under the lock, when the run starts
        require_trackers(protocol.train.track)  # a missing library is refused before anything is written
        self.at_ckpt = at_checkpoints(protocol.measures)  # measures that run at checkpoints (the LLC)
        for m, config in self.at_ckpt:
            m.check(config, cfg)  # as is a config this model or installation cannot run
        self.cfg = cfg
        self.data = task if data is None else data
        self.evals = EvalSet.build(task, protocol.measures, protocol.seeds.eval, cfg.n_ctx, device)
        self.total = protocol.train.total_steps
        self.bs = protocol.train.batch_size
        self.eval_steps = set(protocol.eval_steps())
        self.ckpt_steps = set(protocol.checkpoint_steps())
        old = {} if overwrite else self.run.read_json(self.run.meta)
        self.meta = old or {**environment(), "seeds": protocol.seeds.model_dump(), "wall_time_s": 0.0, "segments": []}
        self.meta.update(model_config=cfg.to_dict())
        self.start_step = 0
        self.resumed = False
        self.loss_sum, self.loss_n = torch.zeros((), device=device), 0  # training loss since the last eval
        self.eval_time = 0.0
        self.last_loss: float | None = None
        self._t0 = 0.0
        self._resolved = resolved
        self.trackers: Trackers | None = None
        self.stop = StopRule(protocol.train.stop, task.main_split) if protocol.train.stop is not None else None
        self.stop_reason: str | None = None
        self._loaded: list[int] | None = None  # the checkpoints :meth:`load` saw

    # --- the loop's calls, in order ------------------------------------------------------

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load the run's last checkpoint (or ``init_from``'s) into ``model`` and ``optimizer``,
        and check the logs a resume would cut; refuses (one line) before anything is written.
        :meth:`start` calls it where the caller has not (an ensemble loads every member first)."""
        done = [] if self.overwrite else list_checkpoints(self.run.checkpoints)
        self.start_step, self.resumed = 0, False
        if done:
            self.start_step, self.resumed = done[-1], True
            sidecar = load_checkpoint(self.run.checkpoints, self.start_step, model, optimizer)
            self.run.metric_rows()  # a damaged log is refused now, not halfway through the truncation
            per_example.check(self.run.path)
            self.loss_sum = torch.tensor(sidecar.get("train_loss_sum", 0.0), device=self.device)
            self.loss_n = sidecar.get("train_loss_n", 0)
        elif self.protocol.init_from is not None:
            try:
                self.meta["init_from"] = init_from(self.protocol.init_from, model, optimizer)
            except OptolabError as e:
                raise self.protocol.locate(e) from None
        self._loaded = done

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Take the run directory (its lock), write the protocol and ``meta.json``, cut the logs
        back to the checkpoint resumed from; returns the first step."""
        if self._loaded is None:
            self.load(model, optimizer)
        self.lock = DirLock(self.run.path)
        try:
            self._take(model, optimizer)
        except BaseException:
            self.release()
            raise
        self._t0 = time.perf_counter()
        return self.start_step

    def _take(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """:meth:`start`'s writes, under the lock (which another writer may have left just now:
        what :meth:`load` saw is checked again)."""
        if self.overwrite:
            self.run.clear()
        else:
            _check_same_protocol(self.run, self._resolved)
            if list_checkpoints(self.run.checkpoints) != self._loaded:
                self.load(model, optimizer)
        if was_stopped(self.run):  # allowed by _check_same_protocol only under another stop rule
            reopen(self.run)
        self.run.write_protocol(self._resolved)
        if not self.resumed:
            self.run.begin_listing()
        self.run.truncate_metrics(self.start_step if self.resumed else -1)  # a run that died before its
        per_example.truncate(self.run.path, self.start_step if self.resumed else -1)  # first checkpoint starts clean
        self._forget_after(self.start_step if self.resumed else -1)
        if self.stop is not None and self.resumed:
            self.stop.replay(self.run.metric_rows())
        self.meta.update(status="running", n_params=sum(p.numel() for p in model.parameters()))
        t = self.protocol.train
        self.meta["segments"].append({"resumed_from_step": self.start_step,
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      **describe_device(self.device), "precision": t.precision,
                                      "deterministic": t.deterministic,
                                      "compiled": self.compiled})
        if t.track:  # a tracker that cannot start is dropped, and meta.json says so
            self.trackers = Trackers(t.track, self.run.path, self._resolved)
            if self.trackers.failures:
                self.meta["tracker_failures"] = list(self.trackers.failures)
        self.run.write_json(self.run.meta, self.meta)

    def busy(self, step: int) -> bool:
        """Whether ``at_step`` has anything to do at ``step`` (an ensemble syncs members only then)."""
        fresh = not (step == self.start_step and self.resumed)
        return fresh and (step in self.eval_steps or step in self.ckpt_steps)

    def done(self, step: int) -> bool:
        """Whether the loop ends after ``step``: the budget is spent or the stop rule said so."""
        return step >= self.total or self.stop_reason is not None

    def at_step(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                eval_model: torch.nn.Module | None = None) -> bool:
        """Evals and checkpoints due at ``step``; True when it evaluated (``last_loss`` is new).
        ``eval_model`` (the same weights in another module, e.g. one shared by an ensemble's
        members so their evals share compiled graphs) is evaluated in place of ``model``."""
        if not self.busy(step):
            return False
        evaluated = step in self.eval_steps
        if evaluated:
            te = time.perf_counter()
            losses: dict | None = {} if self.protocol.measures.per_example else None
            with autocast(self.device, self.protocol.train.precision):
                rows = evaluate(model if eval_model is None else eval_model, self.task, self.protocol.measures,
                                self.evals, self.forward, step, losses)
            if self.loss_n:
                rows.append({"split": "train_batches", "metric": "loss", "layer": None, "head": None,
                             "value": self.loss_sum.item() / self.loss_n})
                self.loss_sum, self.loss_n = torch.zeros((), device=self.device), 0
            self.run.append_metrics([{"step": step, "sequences": step * self.bs, **r} for r in rows])
            if losses:
                per_example.append(self.run.path, step, step * self.bs, losses)
            if self.trackers is not None:
                self.trackers.scalars(step, rows)
            self.eval_time += time.perf_counter() - te
            main = self.task.main_split
            self.last_loss = next(r["value"] for r in rows if r["split"] == main and r["metric"] == "loss")
            if not math.isfinite(self.last_loss):
                self.diverged(step, f"the {main} eval loss is {self.last_loss}")
            if self.stop is not None and step < self.total:
                self.stop_reason = self.stop.update(step, step * self.bs, rows)
        if step in self.ckpt_steps or self.stop_reason is not None:
            bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is not None:  # never checkpoint a broken model: the last good one stays the last
                self.diverged(step, f"parameter {bad} is not finite")
            self._checkpoint_measures(step, model)  # before the checkpoint: a resume from the last one redoes them
            self.run.list_checkpoint(stem(step))  # before writing: an interrupted write's leftovers are the run's
            save_checkpoint(self.run.checkpoints, step, step * self.bs, model, optimizer,
                            {"name": self.protocol.name, "train_loss_sum": self.loss_sum.item(),
                             "train_loss_n": self.loss_n})
            prune(self.run.checkpoints, self.protocol.train.checkpoints.keep, protect={self.total})
        return evaluated

    def _forget_after(self, step: int) -> None:
        for m, _ in self.at_ckpt:
            m.forget_after(self.run.path / "measures" / m.NAME, step)

    def _checkpoint_measures(self, step: int, model: torch.nn.Module) -> None:
        """The measures that run at checkpoints (every ``every``-th checkpoint and the last)."""
        if not self.at_ckpt:
            return
        order = sorted(self.ckpt_steps)
        rows: list[dict] = []
        te = time.perf_counter()
        for m, config in self.at_ckpt:
            if step != self.total and order.index(step) % config.every:
                continue
            rows += m.on_checkpoint(CheckpointData(
                model, lambda: eager_forward(self.protocol, self.task, self.cfg, self.device),
                PlainForward, self.task, self.data, step, step * self.bs, self.bs, self.total, config,
                self.run.path / "measures" / m.NAME))
        if rows:
            self.run.append_metrics([{"step": step, "sequences": step * self.bs, **r} for r in rows])
            if self.trackers is not None:
                self.trackers.scalars(step, rows)
        self.meta["checkpoint_measures_s"] = self.meta.get("checkpoint_measures_s", 0.0) + time.perf_counter() - te

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.loss_n += 1

    def check_loss(self, step: int, loss: torch.Tensor) -> None:
        """Stop on a non-finite training loss (one scalar check per step, before the update)."""
        if not torch.isfinite(loss):
            self.diverged(step, f"the training loss is {loss.item()}")

    def finish(self, step: int) -> dict:
        wall = time.perf_counter() - self._t0
        self.meta["wall_time_s"] = self.meta.get("wall_time_s", 0.0) + wall
        self.meta["segments"][-1].update(wall_time_s=wall, eval_time_s=self.eval_time, ended_at_step=step)
        summary: dict = {}
        if step >= self.total or self.stop_reason is not None:
            self.run.write_parquet()
            self.run.finish_log()
            summary = summarize(self.run.metrics(), self.task, self.protocol, self._speed())
            if self.stop_reason is not None and step < self.total:
                summary.update(status="stopped", stopped=stopped_summary(self.stop_reason, step, self.bs, self.total))
            self.run.write_json(self.run.summary, summary)
            self.meta["status"] = summary["status"]
        else:
            self.meta["status"] = "stopped"
        self.run.write_json(self.run.meta, self.meta)
        self.release()
        return summary

    def _speed(self) -> tuple | None:
        """The per-example loss trajectory's speed over training, for the stages (or None)."""
        _, sequences, arrays = per_example.load(self.run.path)
        X = arrays.get(self.task.main_split)
        if X is None or len(X) < 4:
            return None
        return sequences[1:], speed(pca(X, sequences))

    def release(self) -> None:
        """Close the trackers and let go of the run directory's lock (the run's last write is
        done; idempotent)."""
        if self.trackers is not None:
            self.trackers.close()
            if self.trackers.failures:  # the run went on; meta.json says what was not tracked
                self.meta["tracker_failures"] = self.trackers.failures
                try:
                    self.run.write_json(self.run.meta, self.meta)
                except OSError:
                    pass  # a full disk: the run's own message says so
            self.trackers = None
        if self.lock is not None:
            self.lock.release()

    def interrupted(self, step: int) -> None:
        self.meta["status"] = "interrupted"
        self.meta["segments"][-1]["ended_at_step"] = step
        self.run.write_json(self.run.meta, self.meta)
        self.release()

    def cannot_write(self, step: int, err: OSError) -> None:
        """Stop a run whose directory cannot be written (a full disk, a file system gone read-only):
        the last checkpoint stays the last, ``meta.json`` says why where it still can, and the same
        command resumes once the cause is gone. Raises :class:`RunFailed` (exit 1)."""
        last = list_checkpoints(self.run.checkpoints)
        why = f"cannot write the run directory ({err.strerror or err}) at step {step}"
        self.meta.update(status="failed", failure=why)
        self.meta["segments"][-1]["ended_at_step"] = step
        try:
            self.run.write_json(self.run.meta, self.meta)
        except OSError:
            pass  # still full: the message below is all we can leave
        self.release()
        raise RunFailed(f"{why}; checkpoints up to step {last[-1] if last else None} are kept.", field="--out",
                        fix="free space (or make the folder writable), then run the same command to resume.")

    def diverged(self, step: int, what: str) -> None:
        """Stop a diverged run (see the module rules); raises :class:`RunFailed`."""
        last = list_checkpoints(self.run.checkpoints)
        last_good = last[-1] if last else None
        self.meta.update(status="failed", failure=f"{what} at step {step}")
        self.meta["segments"][-1]["ended_at_step"] = step
        self.run.write_json(self.run.meta, self.meta)
        self.run.write_parquet()
        self.run.write_json(self.run.summary, {
            "name": self.protocol.name, "status": "failed", "main_split": self.task.main_split,
            "failure": {"step": step, "sequences": step * self.bs, "what": what},
            "last_checkpoint_step": last_good})
        self.release()
        raise RunFailed(f"the run diverged: {what} at step {step}. It is marked failed in summary.json; "
                        f"metrics so far and checkpoints up to step {last_good} are kept.",
                        field="train.lr", fix="lower train.lr or set train.grad_clip, then run with --overwrite.")


def eager_forward(protocol: Protocol, task: Task, cfg, device: torch.device) -> Forward:
    """The protocol's Forward without compilation: plain without clamps, else the clamp engine
    with the protocol's clamp plan (made once per protocol) on ``device``."""
    if not protocol.clamps:
        return PlainForward()
    return ClampForward(protocol.clamp_plan(task, cfg).to_device(device), backend=protocol.train.clamp_engine,
                        seeds=(protocol.seeds.init, protocol.seeds.data))


INIT_FROM_DAMAGED = ("point init_from at another checkpoint (another init_from.step, or another "
                     "step_*.safetensors file) written by `optolab run`.")


def init_from(spec, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load ``init_from``'s checkpoint into a fresh run's model (and Adam state); what meta.json
    records of it."""
    weights, _ = find_checkpoint(spec.run, spec.step, "init_from.run", "init_from.step")
    load_weights(weights, model, "init_from.run", damaged_fix=INIT_FROM_DAMAGED,
                 mismatch_fix="init_from needs a run of the same model (layers, heads, widths, input and output sizes).")
    if spec.optimizer:
        load_optimizer_state(weights, model, optimizer, "init_from.optimizer",
                             damaged_fix="set init_from.optimizer: false, or " + INIT_FROM_DAMAGED)
    return {"checkpoint": str(weights), "optimizer": spec.optimizer}


def _as_now(recorded: dict) -> dict:
    """A recorded protocol as this version of optolab resolves it: fields added since the run
    started (a new measure, a new option) take their defaults, so they do not count as a change;
    what the user wrote still does. A record the schema no longer accepts stays as it was."""
    try:
        return Protocol.model_validate(recorded).resolved()
    except (ValidationError, OptolabError):
        return recorded


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, …: _refuse_foreign says so in one line
        return False


def _refuse_foreign(run: RunDir) -> None:
    """Refuse a folder that holds something but no run (nothing of the user's is touched)."""
    try:
        exists, is_dir = run.path.exists(), run.path.is_dir()
        foreign = is_dir and not run.protocol.is_file() and any(p.name != LOCK_NAME for p in run.path.iterdir())
    except OSError as e:  # a name too long, a folder we may not read, …
        raise OptolabError(f"cannot create '{run.path}': {e.strerror}.", field="--out",
                           fix="choose a folder you can write to, with a shorter name.") from None
    if exists and not is_dir:
        raise OptolabError(f"'{run.path}' is a file, not a folder.", field="--out",
                           fix="choose a new folder for the run.")
    if foreign:
        raise OptolabError(f"'{run.path}' exists and is not an optolab run directory.", field="--out",
                           fix="choose an empty or new folder.")


NOT_IDENTITY = ("device", "compile", "track", "checkpoints", "stop")


def _identity(resolved: dict) -> dict:
    """What makes two protocols the same run: everything but how it computes (``train.device``
    and ``train.compile``: a run trained on a GPU may resume on a CPU, an eager run compiled,
    equal up to float rounding; each segment records its device and path in meta.json) and
    where else it is logged (``train.track``) or when it saves its state (``train.checkpoints``).
    So a run started before ``compile: auto`` or today's checkpoint schedule were the defaults
    resumes under the same command."""
    train = resolved.get("train")
    if isinstance(train, dict):
        resolved = {**resolved, "train": {k: v for k, v in train.items() if k not in NOT_IDENTITY}}
    return resolved


def _check_same_protocol(run: RunDir, resolved: dict) -> None:
    """Refuse to mix two protocols in one run directory (and so to lose anything written)."""
    if not run.protocol.is_file():
        return
    try:
        existing = _as_now(yaml.safe_load(run.protocol.read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        existing = None
    if not isinstance(existing, dict):
        raise OptolabError(f"'{run.protocol}' is damaged (not a readable protocol).", field="--out",
                           fix="pass --overwrite to redo the run, or another --out.")
    rules = [(d.get("train") or {}).get("stop") if isinstance(d.get("train"), dict) else None
             for d in (existing, resolved)]
    existing, resolved = _identity(existing), _identity(resolved)
    if existing != resolved:
        changed = sorted(k for k in set(existing) | set(resolved) if existing.get(k) != resolved.get(k))
        raise OptolabError(
            f"'{run.path}' holds a run of a different protocol (sections differ: {', '.join(changed)}).",
            field="--out", fix="pass another --out, or --overwrite to discard that run.")
    if (run.path / "summary.json").is_file():
        recorded = json.loads((run.path / "summary.json").read_text())
        if recorded.get("status") == "stopped" and rules[0] != rules[1]:
            return  # stopped at its answer; under another stop rule (or none) it resumes (RunBook.start)
        if recorded.get("status") == "failed":
            raise OptolabError(f"'{run.path}' holds a run of this protocol that diverged (see its summary.json).",
                               field="--out", fix="change train.lr or train.grad_clip and use another --out, "
                               "or pass --overwrite to redo it.")
        raise OptolabError(f"'{run.path}' already holds a finished run of this protocol.", field="--out",
                           fix="open it with `optolab plot` / optolab.open_run, or pass --overwrite to redo it.")
