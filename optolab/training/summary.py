"""``summary.json``: the numbers a reader looks for first.

- ``final``: every metric at the last eval, ``{split: {metric: value | {"L{l}H{h}": value}}}``.
- ``time_to_loss_0.5``: the first eval where the main split's loss is below 0.5 (the
  phase-change midpoint of ANCHORS §3), as ``{"step", "sequences"}``, or null.
- ``time_to_loss_0.277``: the same at 0.4·ln 2 (Singh et al.'s learning time).
- ``phase_change``: the main split's loss drop found by :func:`optolab.measures.phase.detect`
  (``onset``, ``midpoint``, ``end`` in sequences, the ``plateau`` before it, …) or null.
- ``stages``: the run's developmental stages from several signals
  (:func:`optolab.measures.stages.stages`): the main loss, the strongest layer-0
  ``prev_token`` and last-layer induction-type score (max over heads at each eval), with
  per-example losses the loss trajectory's speed, and with ``measures.llc`` the LLC at
  checkpoints (abrupt rises and falls both); each ``{start, end, kind, boundary_signals,
  moved}`` in sequences.
- ``readout``: which model the evals read (:func:`readout`): ``unclamped`` (no clamp acts on an
  eval), ``clamped`` (a clamp acts at every eval: the condition is the clamped model) or
  ``clamped inside windows`` (evals inside a clamp's window read its output, the others the
  model itself, so times and final values there mix the clamp's direct effect on the readout
  with its effect on learning), with the clamps that act on evals and their step windows.
- ``main_split``, ``icl_positions`` (token tasks), ``final_step``, ``final_sequences``.
- ``status``: ``finished``; a run that diverged writes only ``status: failed``, ``failure``
  (step, sequences, what) and ``last_checkpoint_step`` (:mod:`optolab.training.trainer`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from optolab.measures.builtin.icl_score import icl_score_positions
from optolab.measures.phase import detect
from optolab.measures.stages import Signal, stages
from optolab.protocol.schema import Protocol
from optolab.tasks import Task

THRESHOLDS = {"0.5": 0.5, "0.277": 0.4 * math.log(2)}


def first_below(df: pd.DataFrame, split: str, threshold: float) -> dict | None:
    loss = df[(df.split == split) & (df.metric == "loss")].sort_values("step")
    hit = loss[loss.value < threshold]
    if hit.empty:
        return None
    row = hit.iloc[0]
    return {"step": int(row.step), "sequences": int(row.sequences)}


SCORES = ("induction_strength", "prefix_matching")  # the head score whose rise is timed, first found


def head_score(m: pd.DataFrame, split: str) -> tuple[str, int] | None:
    """``(metric, layer)`` of the induction-type score to follow: the first of :data:`SCORES`
    the run measured on its main split, in the last layer."""
    for metric in SCORES:
        rows = m[(m.split == split) & (m.metric == metric) & m["src_layer"].isna()]
        if not rows.empty:
            return metric, int(rows["layer"].max())
    return None


def phase_change(df: pd.DataFrame, split: str) -> dict | None:
    loss = df[(df.split == split) & (df.metric == "loss")].sort_values("step")
    found = detect(loss.sequences.to_numpy(), loss.value.to_numpy())
    return found.event.to_dict() if found.event is not None else None


def stage_signals(df: pd.DataFrame, split: str, speed: tuple | None = None) -> dict:
    """The curves stages are read from (see the module rules): name -> Signal."""
    loss = df[(df.split == split) & (df.metric == "loss")].sort_values("step")
    signals = {"loss": Signal(loss.sequences.to_numpy(float), loss.value.to_numpy(float), "down")}
    picks = [("prev_token", 0)] + ([head_score(df, split)] if head_score(df, split) else [])
    for metric, layer in picks:
        rows = df[(df.split == split) & (df.metric == metric) & (df["layer"] == layer) & df["src_layer"].isna()]
        if not rows.empty:
            best = rows.groupby("sequences").value.max()
            signals[f"{metric} L{layer}"] = Signal(best.index.to_numpy(float), best.to_numpy(float), "up")
    llc = df[(df.split == "llc") & (df.metric == "llc")].sort_values("step")
    if len(llc) >= 4:  # the LLC at checkpoints (measures.llc): Hoogland's stages turn it both ways
        xs, ys = llc.sequences.to_numpy(float), llc.value.to_numpy(float)
        signals["llc rises"] = Signal(xs, ys, "up")
        signals["llc falls"] = Signal(xs, ys, "down")
    if speed is not None and len(speed[0]) >= 3:
        signals["trajectory speed"] = Signal(np.asarray(speed[0], float), np.log(np.asarray(speed[1], float) + 1e-12),
                                             "up")
    return signals


def readout(protocol: Protocol) -> dict:
    """Which model the evals read (see the module rules): ``{"model", "clamps"}``, each clamp that
    acts on evals as ``{"clamp", "steps": [start, stop)}`` (stop = the budget: to the end)."""
    total, bs = protocol.train.total_steps, protocol.train.batch_size
    acting, everywhere = [], []
    for k, spec in enumerate(protocol.clamps):
        if not (type(spec).acts_on_forward and spec.apply_at in ("eval", "both")):
            continue
        w = spec.window
        per = bs if w.unit == "sequences" else 1
        start, stop = math.ceil(w.start / per), total if w.stop is None else math.ceil(w.stop / per)
        acting.append({"clamp": spec.name or f"clamps.{k} ({spec.kind})", "steps": [start, stop]})
        everywhere.append(start == 0 and stop == total)
    model = "unclamped" if not acting else "clamped" if all(everywhere) else "clamped inside windows"
    return {"model": model, "clamps": acting}


def summarize(df: pd.DataFrame, task: Task, protocol: Protocol, speed: tuple | None = None) -> dict:
    """The summary (see the module rules); ``speed``: ``(sequences, speed)`` of the per-example
    loss trajectory, when the run kept per-example losses."""
    last = df[df.step == df.step.max()]
    final: dict = {}
    for row in last.itertuples(index=False):
        split = final.setdefault(row.split, {})
        if pd.isna(row.layer):
            split[row.metric] = row.value
        elif not pd.isna(row.src_layer):
            split.setdefault(row.metric, {})[f"L{row.src_layer}H{row.src_head}->L{row.layer}H{row.head}"] = row.value
        else:
            split.setdefault(row.metric, {})[f"L{row.layer}H{row.head}"] = row.value
    out = {
        "name": protocol.name,
        "status": "finished",
        "main_split": task.main_split,
        "final_step": int(df.step.max()),
        "final_sequences": int(df.sequences.max()),
        "readout": readout(protocol),
        **{f"time_to_loss_{k}": first_below(df, task.main_split, v) for k, v in THRESHOLDS.items()},
        "phase_change": phase_change(df, task.main_split),
        "stages": stages(stage_signals(df, task.main_split, speed)),
        "final": final,
    }
    probe = task.eval_batch(task.main_split, protocol.seeds.eval, 1)
    if probe.tokens is not None:
        out["icl_positions"] = icl_score_positions(probe)
    return out
