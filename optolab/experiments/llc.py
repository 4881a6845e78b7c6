"""The LLC of a finished (or running) run, post hoc: ``optolab llc RUN_DIR`` on its saved
checkpoints, and the calibration of the sampler's hyperparameters on one checkpoint
(``--calibrate``). The estimator and its method: :mod:`optolab.measures.llc`.

Rules:
- A post-hoc curve writes to ``RUN_DIR/measures/llc/posthoc_<hash>/`` (``config.json``,
  ``estimates.jsonl``, the sampler's traces per checkpoint, ``llc.png``), one folder per
  distinct configuration: another step size never overwrites a curve, and the same command run
  again skips the checkpoints it has (estimates are deterministic), so it resumes.
- A calibration writes ``RUN_DIR/measures/llc/calibration_<step>/``: ``calibration.csv`` (one
  row per step size × nβ: LLC mean and spread, and the diagnostics below) and ``traces.png``
  (every chain's loss trace, one panel per cell), as devinterp's calibration guidance shows them.
  A cell is ``ok`` when its chains stay finite, its LLC is positive, and the traces have
  settled: the mean of the last quarter of draws (after burn-in) is within three standard
  errors of the third quarter's, the errors taken from the draws' own scatter with neighbouring
  draws counted as correlated (``TAU``). Otherwise it says which test failed: ``diverged``,
  ``negative``, ``drifting``. Look at ``traces.png`` too: choose a step size whose traces are
  flat after the burn-in at the nβ you keep, and keep both for the whole curve.
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

from optolab.core.errors import OptolabError
from optolab.core.lock import DirLock
from optolab.experiments.runs import open_run
from optolab.measures import llc
from optolab.model.forward import PlainForward
from optolab.protocol.data_schedule import train_data
from optolab.training.trainer import make_forward

CPU = torch.device("cpu")
TAU = 5.0  # draws per independent draw assumed by the drift test (SGLD traces are autocorrelated)


def base_spec(run, overrides: dict) -> llc.LLCSpec:
    """The run's own ``measures.llc`` (or the defaults), with ``overrides`` (None values ignored)."""
    own = getattr(run.protocol.measures, "llc", None)
    data = own.model_dump() if own is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return llc.LLCSpec.model_validate(data)
    except Exception as e:  # pydantic's message, as one line
        raise OptolabError(f"bad LLC setting: {e}".replace("\n", " "), field="optolab llc",
                           fix="see optolab llc --help.") from None


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
                    f"{e.target} {e.mean:.3g} ± {e.std:.2g}" for e in found), flush=True)
        df = llc.load(folder)
        from optolab.experiments.plots import plot_llc

        plot_llc(df, run.metrics, run.task.main_split, folder / "llc.png")
    finally:
        lock.release()
    return df, folder


def verdict(traces: np.ndarray, per_chain: np.ndarray, burn_in: int) -> str:
    """``ok``, or which calibration test failed (see the module rules)."""
    if not np.isfinite(traces).all() or not np.isfinite(per_chain).all():
        return "diverged"
    if per_chain.mean() <= 0:
        return "negative"
    draws = traces[:, burn_in:]
    q = draws.shape[1] // 4
    if q >= 4:
        third, last = draws[:, 2 * q:3 * q], draws[:, 3 * q:]
        # the standard error of the two quarters' difference, from the draws' own scatter,
        # allowing neighbouring draws to be correlated (an effective sample of q / TAU per chain)
        scatter = float(np.sqrt((third.var(axis=1, ddof=1).mean() + last.var(axis=1, ddof=1).mean()) / 2))
        se = scatter * np.sqrt(2 * TAU / (q * draws.shape[0]))
        if abs(last.mean() - third.mean()) > 3 * se:
            return "drifting"
    return "ok"


def calibrate(run_dir: str | Path, spec: llc.LLCSpec, step: int | None, step_sizes: list[float],
              nbetas: list[float], progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Sweep step size × nβ on one checkpoint (default: the last); see the module rules."""
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
        folder.mkdir(parents=True, exist_ok=True)
        for eps in step_sizes:
            for nb in nbetas:
                cell = spec.model_copy(update={"step_size": eps, "nbeta": nb, "heads": []})
                (e,) = _estimates(run, data, cell, model, step)
                v = verdict(e.traces, e.llc_per_chain, cell.burn_in)
                rows.append({"step": step, "step_size": eps, "nbeta": nb, "llc": e.mean, "llc_std": e.std,
                             "init_loss": float(e.init_losses.mean()), "verdict": v})
                traces[(eps, nb)] = (e.traces, e.init_losses)
                if progress:
                    print(f"step size {eps:.1e}, nβ {nb:.3g}: LLC {e.mean:.3g} ± {e.std:.2g} ({v})", flush=True)
        df = pd.DataFrame(rows)
        df.to_csv(folder / "calibration.csv", index=False)
        from optolab.experiments.plots import plot_llc_calibration

        plot_llc_calibration(traces, df, folder / "traces.png")
    finally:
        lock.release()
    return df, folder
