"""``summary.json``: the numbers a reader looks for first.

- ``final``: every metric at the last eval, ``{split: {metric: value | {"L{l}H{h}": value}}}``.
- ``time_to_loss_0.5``: the first eval where the main split's loss is below 0.5 (the
  phase-change midpoint of ANCHORS §3), as ``{"step", "sequences", "sequences_interpolated"}``
  (the last: linear between that eval and the one before, as sweep reports give it), or null.
- ``time_to_loss_0.277``: the same at 0.4·ln 2 (Singh et al.'s learning time).
- ``phase_change``: the main split's loss drop found by :func:`optolab.measures.phase.detect`
  (``onset``, ``midpoint``, ``end`` in sequences, the ``plateau`` before it, …) or null.
- ``stages``: the run's developmental stages from several signals
  (:func:`optolab.measures.stages.stages`): the main loss, the strongest first-layer
  previous-token-type and last-layer induction-type score (max over heads at each eval; the
  measures' ``previous_token`` and ``induction`` curves, :class:`optolab.measures.measure.Curve`),
  with per-example losses the loss trajectory's speed, and every ``stage`` curve (the LLC at
  checkpoints with ``measures.llc``: abrupt rises and falls both); each ``{start, end, kind,
  boundary_signals, moved}`` in sequences.
- Entries the switched-on measures add (:meth:`optolab.measures.measure.Measure.summary`), e.g.
  ``icl_positions`` (token tasks: the positions ``icl_score`` compares).
- ``readout``: which model the evals read (:func:`readout`): ``unclamped`` (no clamp acts on an
  eval), ``clamped`` (a clamp acts at every eval: the condition is the clamped model) or
  ``clamped inside windows`` (evals inside a clamp's window read its output, the others the
  model itself, so times and final values there mix the clamp's direct effect on the readout
  with its effect on learning), with the clamps that act on evals and their step windows.
- ``main_split``, ``final_step``, ``final_sequences``.
- ``status``: ``finished``; a run that diverged writes only ``status: failed``, ``failure``
  (step, sequences, what) and ``last_checkpoint_step`` (:mod:`optolab.training.trainer`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from optolab.measures import registry
from optolab.measures.phase import detect
from optolab.measures.stages import Signal, stages
from optolab.protocol.schema import Protocol
from optolab.tasks import Task

THRESHOLDS = {"0.5": 0.5, "0.277": 0.4 * math.log(2)}


def first_below(df: pd.DataFrame, split: str, threshold: float) -> dict | None:
    """The first eval strictly below ``threshold`` (``step``, ``sequences``) and
    ``sequences_interpolated``: linear between the eval before it and it, the number sweep reports
    use (:func:`optolab.experiments.stats.crossing_time`); both, so no reader meets two unlabelled
    "times to loss 0.5" (the quickstart's 48,000 here and 4.64e4 in its report)."""
    loss = df[(df.split == split) & (df.metric == "loss")].sort_values("step")
    loss = loss[loss.value.notna()]
    hit = loss[loss.value < threshold]
    if hit.empty:
        return None
    at = loss.index.get_loc(hit.index[0])
    row = loss.iloc[at]
    out = {"step": int(row.step), "sequences": int(row.sequences), "sequences_interpolated": float(row.sequences)}
    if at > 0:
        prev = loss.iloc[at - 1]  # above the threshold, so the fraction lies in (0, 1]
        frac = (prev.value - threshold) / (prev.value - row.value)
        out["sequences_interpolated"] = float(prev.sequences + frac * (row.sequences - prev.sequences))
    return out


def _head_curve(m: pd.DataFrame, split: str, role: str, pick) -> tuple[str, int] | None:
    """``(metric, layer)`` of the first measure's ``role`` curve on ``split`` that the run has."""
    for curve in registry.curves(role):
        if curve.split is not None:
            continue
        rows = m[(m.split == split) & (m.metric == curve.metric) & m["src_layer"].isna()]
        if not rows.empty:
            return curve.metric, int(pick(rows["layer"]))
    return None


def head_score(m: pd.DataFrame, split: str) -> tuple[str, int] | None:
    """``(metric, layer)`` of the induction-type score to follow: the first measure (in run
    order) whose ``induction`` curve the run measured on its main split, in the last layer."""
    return _head_curve(m, split, "induction", lambda layers: layers.max())


def previous_token_score(m: pd.DataFrame, split: str) -> tuple[str, int] | None:
    """``(metric, layer)`` of the first layer's previous-token-type score, as :func:`head_score`."""
    return _head_curve(m, split, "previous_token", lambda layers: layers.min())


def phase_change(df: pd.DataFrame, split: str) -> dict | None:
    loss = df[(df.split == split) & (df.metric == "loss")].sort_values("step")
    found = detect(loss.sequences.to_numpy(), loss.value.to_numpy())
    return found.event.to_dict() if found.event is not None else None


def stage_signals(df: pd.DataFrame, split: str, speed: tuple | None = None) -> dict:
    """The curves stages are read from (see the module rules): name -> Signal."""
    loss = df[(df.split == split) & (df.metric == "loss")].sort_values("step")
    signals = {"loss": Signal(loss.sequences.to_numpy(float), loss.value.to_numpy(float), "down")}
    picks = [p for p in (previous_token_score(df, split), head_score(df, split)) if p is not None]
    for metric, layer in picks:
        rows = df[(df.split == split) & (df.metric == metric) & (df["layer"] == layer) & df["src_layer"].isna()]
        if not rows.empty:
            best = rows.groupby("sequences").value.max()
            signals[f"{metric} L{layer}"] = Signal(best.index.to_numpy(float), best.to_numpy(float), "up")
    for curve in registry.curves("stage"):  # e.g. the LLC at checkpoints: Hoogland's stages turn it both ways
        at = df[(df.split == (curve.split or split)) & df["layer"].isna()]
        rows = at[at.metric == curve.metric].sort_values("step")
        if curve.valid is not None and (at.metric == curve.valid).any():  # runs before the marker: all
            ok = at[(at.metric == curve.valid) & (at.value == 1)].step
            rows = rows[rows.step.isin(ok)]
        if len(rows) >= 4:
            xs, ys = rows.sequences.to_numpy(float), rows.value.to_numpy(float)
            signals[f"{curve.metric} rises"] = Signal(xs, ys, "up")
            signals[f"{curve.metric} falls"] = Signal(xs, ys, "down")
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
    for measure in registry.active(protocol.measures):
        out.update(measure.summary(task, protocol.seeds.eval))
    return out
