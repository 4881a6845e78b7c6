"""The LLC of a finished (or running) run, post hoc: ``optolab llc RUN_DIR`` on its saved
checkpoints, and the calibration of the sampler's hyperparameters on one checkpoint
(``--calibrate``). The estimator and its method: :mod:`optolab.measures.llc`.

Rules:
- A post-hoc curve writes to ``RUN_DIR/measures/llc/posthoc_<hash>/`` (``config.json``,
  ``estimates.jsonl``, the sampler's traces per checkpoint, ``llc.png``), one folder per
  distinct configuration: another step size never overwrites a curve, and the same command run
  again skips the checkpoints it has (estimates are deterministic), so it resumes.
- Settings are validated before anything is written (each flag, and each cell of a
  calibration's grid), through the one error translation (:mod:`optolab.core.errors`): a bad
  ``--step-sizes`` or ``--nbetas`` is one line naming the flag, and leaves no folder behind.
- Every estimate carries its chain health (:func:`optolab.measures.llc.health`: the sampled loss
  against the checkpoint's, the trend over the draws, divergence) in ``estimates.jsonl``; a curve
  prints one warning line per estimate whose verdict is not ``ok`` (negative LLCs included).
- A calibration writes ``RUN_DIR/measures/llc/calibration_<step>/`` once every cell has run:
  ``calibration.csv`` (one row per step size × nβ: LLC mean and spread, the chains' largest
  excess loss and trend, the verdict, and which cell is recommended) and ``traces.png`` (every
  chain's loss trace, one panel per cell, all panels on one y-scale so a climb shows beside a
  flat trace, with the checkpoint's loss and the allowed band). The recommendation
  (:func:`recommend`): among the ``ok`` cells, the smallest nβ (the widest posterior that still
  stays within ``EXCESS_TOL`` of the checkpoint's loss), and at that nβ the largest step size
  (the fastest-mixing chain). No ``ok`` cell: no recommendation, and the reason.
- The run's directory is locked while writing (one writer per run directory); the run's own
  files are never touched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from optolab.core.errors import OptolabError, from_validation_error
from optolab.core.lock import DirLock
from optolab.experiments.runs import open_run
from optolab.measures import llc
from optolab.model.forward import PlainForward
from optolab.protocol.data_schedule import train_data
from optolab.training.trainer import make_forward

CPU = torch.device("cpu")
FLAGS = {"every": "--every", "chains": "--chains", "draws": "--draws", "burn_in": "--burn-in",
         "step_size": "--step-size", "nbeta": "--nbeta", "localization": "--localization",
         "batch_size": "--batch-size", "heads": "--heads", "clamps": "--no-clamps", "seed": "--seed"}
GRID_FLAGS = {**FLAGS, "step_size": "--step-sizes", "nbeta": "--nbetas"}
STEP_SIZES = [1e-5, 3e-5, 1e-4]  # a calibration's default grid: 12 cells around the defaults
NBETAS = [300.0, 1000.0, 3000.0, 10000.0]


def validated(data: dict, flags: dict = FLAGS) -> llc.LLCSpec:
    """``data`` as an LLCSpec, or one line blaming the flag it came from."""
    from pydantic import ValidationError

    try:
        return llc.LLCSpec.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e, model=llc.LLCSpec, flags=flags) from None


def base_spec(run, overrides: dict) -> llc.LLCSpec:
    """The run's own ``measures.llc`` (or the defaults), with ``overrides`` (None values ignored)."""
    own = getattr(run.protocol.measures, "llc", None)
    data = own.model_dump() if own is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validated(data)


def grid(spec: llc.LLCSpec, step_sizes: list[float], nbetas: list[float]) -> list[llc.LLCSpec]:
    """A calibration's cells, each validated (a bad step size or nβ names its flag)."""
    base = spec.model_dump()
    return [validated({**base, "step_size": eps, "nbeta": nb, "heads": []}, GRID_FLAGS)
            for eps in step_sizes for nb in nbetas]


def _forward(run, spec: llc.LLCSpec, model):
    if not spec.clamps or not run.protocol.clamps:
        return PlainForward()
    return make_forward(run.protocol, run.task, model.cfg, CPU, compiled=False)


def _estimates(run, data, spec: llc.LLCSpec, model, step: int) -> list[llc.Estimate]:
    """The whole-model and ``spec.heads``' LLCs of ``model`` (the checkpoint at ``step``), with
    the clamps and data of the training step after it."""
    forward = _forward(run, spec, model)
    try:
        return llc.estimates(model, data, forward, spec, batch_size=run.protocol.train.batch_size,
                             step=llc.clamp_step(step, run.protocol.train.total_steps))
    finally:
        forward.close()


def _config_hash(spec: llc.LLCSpec) -> str:
    return hashlib.sha1(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:8]


def curve(run_dir: str | Path, spec: llc.LLCSpec, steps: list[int] | None = None,
          progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Estimate the LLC at the run's checkpoints (``steps``: some of them; default every
    ``spec.every``-th and the last) into the configuration's post-hoc folder; returns every
    estimate of that folder and the folder."""
    llc.require()
    run = open_run(run_dir)
    have = run.checkpoint_steps
    if not have:
        raise OptolabError(f"'{run.path}' has no checkpoints.", field="RUN_DIR",
                           fix="train the run first (its checkpoints are what the LLC is estimated at).")
    if steps is None:
        steps = sorted(set(have[::spec.every]) | {have[-1]})
    missing = sorted(set(steps) - set(have))
    if missing:
        raise OptolabError(f"no checkpoint at step(s) {missing[:5]} in '{run.path}'.", field="--steps",
                           fix=f"choose from the checkpoints: {have[:8]}{' …' if len(have) > 8 else ''}.")
    data = train_data(run.protocol, run.task)
    model0 = run.model(have[-1])
    llc.check_heads(spec.heads, model0.cfg.n_layers, model0.cfg.n_heads, field="--heads")
    folder = run.path / "measures" / "llc" / f"posthoc_{_config_hash(spec)}"
    lock = DirLock(run.path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
        done = set(llc.load(folder).step.astype(int)) if (folder / "estimates.jsonl").is_file() else set()
        bs = run.protocol.train.batch_size
        for i, step in enumerate(steps):
            if step in done:
                continue
            found = _estimates(run, data, spec, run.model(step), step)
            llc.save(folder, step, step * bs, found, source="posthoc")
            if progress:
                print(f"step {step:>9,} ({i + 1}/{len(steps)}): " + ", ".join(
                    f"{e.target} {e.mean:.3g} ± {e.std:.2g} ({e.health().verdict})" for e in found), flush=True)
                for e in found:
                    if e.health().warning():
                        print(f"  warning: step {step:,}, {e.target}: {e.health().warning()}", flush=True)
        df = llc.load(folder)
        from optolab.experiments.plots import plot_llc

        plot_llc(df, run.metrics, run.task.main_split, folder / "llc.png")
    finally:
        lock.release()
    return df, folder


def recommend(table: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """The recommended cell of a calibration table and the rule, or None and why (module rules)."""
    ok = table[table.verdict == "ok"]
    if ok.empty:
        most = table.verdict.value_counts().index[0] if len(table) else "none"
        advice = {"negative": "the checkpoint is no minimum at these settings (SGLD finds lower loss): calibrate "
                              "on a later checkpoint (--step), where training has settled.",
                  "drifting": "the chains have not settled: more --burn-in and --draws, or larger step sizes."}
        return None, f"no cell is ok (most are '{most}'): " + advice.get(
            most, "try larger nβ and smaller step sizes (--nbetas, --step-sizes).")
    nb = ok.nbeta.min()
    row = ok[ok.nbeta == nb].sort_values("step_size").iloc[-1]
    return row, (f"step size {row.step_size:.3g}, nβ {row.nbeta:.4g}: the smallest nβ whose chains stay within "
                 f"{llc.EXCESS_TOL} nats of the checkpoint's loss, settled and finite, at its largest such step size.")


def calibrate(run_dir: str | Path, spec: llc.LLCSpec, step: int | None, step_sizes: list[float],
              nbetas: list[float], progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Sweep step size × nβ on one checkpoint (default: the last); see the module rules."""
    cells = grid(spec, step_sizes, nbetas)  # before anything is read or written
    llc.require()
    run = open_run(run_dir)
    have = run.checkpoint_steps
    if not have:
        raise OptolabError(f"'{run.path}' has no checkpoints.", field="RUN_DIR", fix="train the run first.")
    step = have[-1] if step is None else step
    if step not in have:
        raise OptolabError(f"no checkpoint at step {step} in '{run.path}'.", field="--step",
                           fix=f"choose from the checkpoints: {have[:8]}{' …' if len(have) > 8 else ''}.")
    model = run.model(step)
    data = train_data(run.protocol, run.task)
    folder = run.path / "measures" / "llc" / f"calibration_{step:09d}"
    rows, traces = [], {}
    lock = DirLock(run.path)
    try:
        for cell in cells:
            (e,) = _estimates(run, data, cell, model, step)
            h = e.health()
            rows.append({"step": step, "step_size": cell.step_size, "nbeta": cell.nbeta, "llc": e.mean,
                         "llc_std": e.std, "init_loss": h.checkpoint_loss,
                         "max_excess": float(np.nanmax(h.excess)) if np.isfinite(h.excess).any() else float("nan"),
                         "max_trend": float(np.nanmax(np.abs(h.trend))) if np.isfinite(h.trend).any() else float("nan"),
                         "verdict": h.verdict})
            traces[(cell.step_size, cell.nbeta)] = (e.traces, e.init_losses)
            if progress:
                print(f"step size {cell.step_size:.1e}, nβ {cell.nbeta:.4g}: LLC {e.mean:.3g} ± {e.std:.2g}, "
                      f"excess loss ≤ {rows[-1]['max_excess']:.3g} ({h.verdict})", flush=True)
        df = pd.DataFrame(rows)
        best, why = recommend(df)
        df["recommended"] = False
        if best is not None:
            df.loc[best.name, "recommended"] = True
        folder.mkdir(parents=True, exist_ok=True)  # only now: an interrupted sweep leaves nothing
        df.to_csv(folder / "calibration.csv", index=False)
        from optolab.experiments.plots import plot_llc_calibration

        plot_llc_calibration(traces, df, folder / "traces.png", llc.EXCESS_TOL)
        if progress:
            print(("recommended: " if best is not None else "no recommendation: ") + why, flush=True)
    finally:
        lock.release()
    return df, folder
