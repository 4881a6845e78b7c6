"""Run directories, opened (:class:`Run`), and training one protocol into one (:func:`run`).

The notebook API (:mod:`optolab.api`) re-exports these.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from optolab.core.errors import OptolabError
from optolab.model.checkpoint import list_checkpoints, load_weights, stem
from optolab.model.transformer import Transformer, build_model
from optolab.protocol.loader import load_protocol, protocol_from_resolved
from optolab.protocol.schema import Protocol
from optolab.tasks import IGNORE, Batch, Task, make_task
from optolab.training.rundir import RunDir
from optolab.training.trainer import make_forward, train

CPU = torch.device("cpu")  # a finished run is read on the CPU: its checkpoints are device-free


class Run:
    """A run directory, opened: protocol, metrics, summary, checkpoints and the model."""

    def __init__(self, path: str | Path, protocol: Protocol | None = None) -> None:
        """``protocol``: the run's own, already loaded (and planned), when the caller has it."""
        self.dir = RunDir(path)
        if not self.dir.protocol.is_file():
            raise OptolabError(f"'{path}' is not a run directory (no protocol.yaml).", field="RUN_DIR",
                               fix="pass a folder written by `optolab run`.")
        self.protocol: Protocol = protocol if protocol is not None else protocol_from_resolved(self.dir.protocol)

    @property
    def path(self) -> Path:
        return self.dir.path

    @cached_property
    def task(self) -> Task:
        return make_task(self.protocol.task)

    @property
    def metrics(self) -> pd.DataFrame:
        return self.dir.metrics()

    @property
    def summary(self) -> dict:
        return self.dir.read_json(self.dir.summary)

    @property
    def meta(self) -> dict:
        return self.dir.read_json(self.dir.meta)

    @property
    def checkpoint_steps(self) -> list[int]:
        return list_checkpoints(self.dir.checkpoints)

    def model(self, step: int | None = None) -> Transformer:
        """The model at checkpoint ``step`` (default: the last one), in eval mode."""
        steps = self.checkpoint_steps
        if not steps:
            raise OptolabError(f"'{self.path}' has no checkpoints yet.", field="RUN_DIR",
                               fix="wait for the first checkpoint or run the protocol.")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise OptolabError(f"no checkpoint at step {step}.", field="step", fix=f"use one of {steps}.")
        cfg = self.protocol.model_config_for(self.task)
        model = build_model(cfg, self.protocol.seeds.init)
        load_weights(self.dir.checkpoints / f"{stem(step)}.safetensors", model)
        return model.eval()

    def nnsight(self, step: int | None = None):
        """The model wrapped in ``nnsight.NNsight`` for interactive interventions."""
        from nnsight import NNsight

        return NNsight(self.model(step))

    def to_transformer_lens(self, step: int | None = None):
        """The model at checkpoint ``step`` (default: the last) as a TransformerLens
        ``HookedTransformer`` with the same logits, without the run's clamps
        (:mod:`optolab.model.export`; needs ``optolab[tl]``)."""
        from optolab.model.export import to_hooked_transformer

        return to_hooked_transformer(self.model(step))

    def head_scores(self, metrics: str | list[str] | None = None, split: str | None = None) -> pd.DataFrame:
        """Per-head scores as a tidy frame: one row per (step, split, layer, head, metric), with
        ``sequences`` and ``value``; composition scores keep their source head (``src_layer``,
        ``src_head``). ``metrics`` and ``split`` pick rows; an unknown name is refused, naming
        the ones the run has."""
        df = self.metrics
        df = df[df["head"].notna()]
        for name, want in (("metric", metrics), ("split", split)):
            if want is None:
                continue
            want = [want] if isinstance(want, str) else list(want)
            unknown = sorted(set(want) - set(df[name]))
            if unknown:
                raise OptolabError(f"no per-head {name} {unknown} in this run.", field=name,
                                   fix=f"use one of {sorted(df[name].unique())}.")
            df = df[df[name].isin(want)]
        cols = ["step", "sequences", "split", "layer", "head", "metric", "value"]
        if "src_layer" in df.columns and df["src_layer"].notna().any():
            cols[5:5] = ["src_layer", "src_head"]
        out = df[cols].astype({"layer": int, "head": int})
        return out.sort_values(cols[:-1]).reset_index(drop=True)

    def eval_batch(self, split: str | None = None, n: int | None = None) -> Batch:
        """The run's fixed eval batch for ``split`` (default: the task's main split)."""
        split = split or self.task.main_split
        return self.task.eval_batch(split, self.protocol.seeds.eval, n or self.protocol.measures.eval_sequences)

    def plot(self) -> list[Path]:
        """(Re)write every figure into ``RUN_DIR/figures``; returns their paths."""
        from optolab.experiments.plots import (
            plot_attention,
            plot_head_scores,
            plot_loss,
            plot_loss_by_position,
            plot_prev_token,
        )

        figs = self.dir.figures
        figs.mkdir(parents=True, exist_ok=True)
        df = self.metrics
        written = [plot_loss(df, self.task, figs / "loss.png"),
                   plot_head_scores(df, self.task, figs / "head_scores.png"),
                   plot_prev_token(df, self.task, figs / "prev_token.png")]
        if self.checkpoint_steps:
            model = self.model()
            sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
            forward = make_forward(self.protocol, self.task, model.cfg, CPU, compiled=False)  # patterns as the clamps left them
            with torch.no_grad():
                _, saved = forward(model, self.eval_batch(n=256), step=self.checkpoint_steps[-1], training=False,
                                   save=sites)
            written.append(plot_attention([saved[s].mean(0) for s in sites], figs / "attention.png"))
            curves = self.task.reference_curves()
            if curves:
                written.append(plot_loss_by_position(self.loss_by_position(), curves, figs / "loss_by_position.png"))
        traj = self.trajectory()
        if traj is not None:
            from optolab.experiments.plots import plot_trajectory

            pc = self.summary.get("phase_change") or {}
            events = {k: pc[k] for k in ("onset", "end") if pc.get(k) is not None}
            written.append(plot_trajectory(traj, self.task.main_split, events, figs / "trajectory.png"))
        if self.summary.get("stages"):
            from optolab.experiments.plots import plot_stages
            from optolab.measures.trajectory import speed as path_speed
            from optolab.training.summary import stage_signals

            speed = (traj.xs[1:], path_speed(traj)) if traj is not None and len(traj.xs) >= 4 else None
            written.append(plot_stages(stage_signals(df, self.task.main_split, speed), self.summary["stages"],
                                       figs / "stages.png"))
        est_dir = self.path / "measures" / "llc"
        if (est_dir / "estimates.jsonl").is_file():
            from optolab.experiments.plots import plot_llc
            from optolab.measures.llc import load

            written.append(plot_llc(load(est_dir), df, self.task.main_split, figs / "llc.png"))
        written = [p for p in written if p is not None]
        if self.protocol.train.track:  # the figures also go to the run's trackers
            from optolab.training.trackers import Trackers

            trackers = Trackers(self.protocol.train.track, self.path, self.protocol.resolved(),
                                after="the figures are written, but not sent to it")
            trackers.images(self.checkpoint_steps[-1] if self.checkpoint_steps else 0, written)
            trackers.close()
        return written

    def trajectory(self, split: str | None = None, k: int = 3):
        """The per-example loss trajectory of ``split`` (default: the main split) on its first
        ``k`` principal components (:mod:`optolab.measures.trajectory`), or None without
        per-example losses (``measures.per_example: false``) or fewer than three evals."""
        from optolab.measures.trajectory import pca
        from optolab.training import per_example

        _, sequences, arrays = per_example.load(self.path)
        X = arrays.get(split or self.task.main_split)
        if X is None or len(X) < 3:
            return None
        return pca(X, sequences, k)

    def loss_by_position(self, split: str | None = None, n: int = 256,
                         steps: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Per-token loss by context position ``[pos]`` (NaN where no loss is taken) on ``n``
        sequences of ``split`` (default: the main split), at every checkpoint (or ``steps``),
        through the protocol's clamps."""
        batch = self.eval_batch(split, n=n)
        keep = batch.targets != IGNORE
        out = {}
        for step in self.checkpoint_steps if steps is None else steps:
            model = self.model(step)
            forward = make_forward(self.protocol, self.task, model.cfg, CPU, compiled=False)
            with torch.no_grad():
                logits, _ = forward(model, batch, step=step, training=False)
            per = F.cross_entropy(logits.transpose(1, 2), batch.targets.clamp_min(0), reduction="none")
            out[step] = torch.where(keep, per, 0.0).sum(0) / keep.sum(0).clamp_min(1)
            out[step][~keep.any(0)] = float("nan")
        return out

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.meta.get('status')!r})"


def open_run(path: str | Path) -> Run:
    return Run(path)


def default_out(protocol: Protocol) -> Path:
    return Path("results") / f"{protocol.name}_s{protocol.seeds.init}"


def run(protocol: Protocol | str | Path, out: str | Path | None = None, *, seed: int | None = None,
        overwrite: bool = False, progress: bool = True, plots: bool = True) -> Run:
    """Train a protocol (a loaded one or a path) into ``out`` and write its figures.

    An existing unfinished run of the same protocol in ``out`` is resumed from its last
    checkpoint; ``overwrite`` discards the run ``out`` holds first (only files optolab wrote:
    anything else there refuses it, and nothing is deleted).
    """
    if not isinstance(protocol, Protocol):
        protocol = load_protocol(protocol, seed=seed)
    elif seed is not None:
        protocol = protocol.model_copy(update={"seeds": protocol.seeds.model_copy(update={"init": seed, "data": seed})})
    out = Path(out) if out is not None else default_out(protocol)
    train(protocol, out, progress=progress, overwrite=overwrite)  # what --overwrite may delete: RunDir.clear
    result = Run(out, protocol)  # the protocol that trained: its clamps are planned already
    if plots:
        result.plot()
    return result


__all__ = ["Run", "default_out", "open_run", "run"]
