"""Seaborn figures of a run, written to ``RUN_DIR/figures/``; all regenerable from the run directory.

- ``loss.png``: loss per eval split (and the running training loss) vs sequences, with the
  task's reference levels (chance among context labels, ln n_labels, …) as dashed lines.
- ``head_scores.png``: per-head induction strength over training for layers ≥ 1 (tasks with
  label structure) or prefix matching on the Olsson probe (token tasks).
- ``prev_token.png``: heatmap of the previous-token score of every head over training.
- ``attention.png``: the final model's mean attention pattern of every head on the main split.
- ``loss_by_position.png`` (tasks with reference curves, e.g. ``markov_icl``): the loss at each
  position at every checkpoint, against the task's per-position reference estimators.
- ``llc.png`` (runs with ``measures.llc``; post-hoc curves in their own folder): the local
  learning coefficient over training with the loss (estimates whose chain-health verdict is not
  ``ok`` ringed in red), and the per-head restricted LLCs.
- ``traces.png`` of an LLC calibration: the sampler's loss traces per step size × nβ, one y-scale.
- ``stages.png``: the main loss (top) and the signals the stages are read from (bottom: each on
  its own range, 0 to 1), with ``summary.json``'s stages shaded by kind, their boundaries solid
  and the boundaries merged inside a stage dotted.

No pyplot: figures are built with ``matplotlib.figure.Figure`` so nothing global (backends,
state) is touched and plotting works headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from optolab.measures.measure import Curve
from optolab.tasks import Task


def plot_loss(df: pd.DataFrame, task: Task, path: Path) -> Path:
    loss = df[(df.metric == "loss") & df.layer.isna()]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=loss, x="sequences", y="value", hue="split", ax=ax, marker=".", markersize=4)
    for i, (label, level) in enumerate(task.reference_losses().items()):
        ax.axhline(level, ls="--", lw=1, color=f"C{7 + i % 3}", label=label)
    ax.set(ylabel="loss (nats)", xlabel="sequences seen", title="Loss per eval split")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _first_curve(df: pd.DataFrame, task: Task, role: str, layers) -> tuple[pd.DataFrame, Curve] | None:
    """The rows of the first measure's ``role`` curve (:class:`Curve`) the run has, in run order."""
    from optolab.measures import registry

    for curve in registry.curves(role):
        rows = df[(df.metric == curve.metric) & (df.split == (curve.split or task.main_split))
                  & df["src_layer"].isna() & layers(df["layer"])]
        if not rows.empty:
            return rows, curve
    return None


def plot_head_scores(df: pd.DataFrame, task: Task, path: Path) -> Path | None:
    main = task.main_split
    found = _first_curve(df, task, "induction", lambda layer: layer >= 1)
    if found is None:
        return None
    ind, curve = found
    title, ylabel = curve.title or curve.metric, curve.metric.replace("_", " ")
    ind = ind.assign(head_label=[f"L{layer}H{h}" for layer, h in zip(ind["layer"], ind["head"])])
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=ind, x="sequences", y="value", hue="head_label", ax=ax, palette="tab20", lw=1.2)
    loss = df[(df.metric == "loss") & (df.split == main)]
    ax2 = ax.twinx()
    ax2.plot(loss.sequences, loss.value, color="black", lw=1, ls=":", label=f"{main} loss")
    ax2.set_ylabel(f"{main} loss", fontsize=8)
    ax.set(ylabel=ylabel, xlabel="sequences seen", title=title)
    ax.legend(fontsize=7, ncol=2, title="head")
    fig.savefig(path, dpi=120)
    return path


def plot_prev_token(df: pd.DataFrame, task: Task, path: Path) -> Path | None:
    found = _first_curve(df, task, "previous_token", lambda layer: layer.notna())
    if found is None:
        return None
    pt, curve = found
    pt = pt.assign(head_label=[f"L{layer}H{h}" for layer, h in zip(pt["layer"], pt["head"])])
    grid = pt.pivot_table(index="head_label", columns="sequences", values="value")
    grid = grid.reindex(sorted(grid.index, key=lambda s: (int(s[1:].split("H")[0]), int(s.split("H")[1]))))
    fig = Figure(figsize=(8, 0.25 * len(grid) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    step = max(1, grid.shape[1] // 10)
    sns.heatmap(grid, ax=ax, cmap="viridis", vmin=0, vmax=1, xticklabels=step,
                cbar_kws={"label": "attention i → i−1"})
    ax.set(title=f"{curve.title or curve.metric} over training", xlabel="sequences seen", ylabel="head")
    fig.savefig(path, dpi=120)
    return path


def plot_attention(patterns: list[torch.Tensor], path: Path) -> Path:
    """``patterns``: per layer, the mean pattern ``[head, q, k]``."""
    L, H = len(patterns), patterns[0].shape[0]
    fig = Figure(figsize=(1.6 * H, 1.7 * L + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(L, H, squeeze=False))
    for layer, pat in enumerate(patterns):
        for h in range(H):
            ax = axes[layer, h]
            # imshow, not seaborn's heatmap: the same picture at a fifth of the cost (16+ panels per run)
            ax.imshow(pat[h].numpy(), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            ax.set_title(f"L{layer}H{h}", fontsize=8)
    fig.suptitle("Final attention patterns (mean over the main eval split; rows: query, cols: key)",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def plot_loss_by_position(per_step: dict[int, torch.Tensor], curves: dict[str, torch.Tensor], path: Path) -> Path:
    """``per_step``: checkpoint step → loss per position; ``curves``: name → reference per position."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    palette = sns.color_palette("viridis", len(per_step))
    for color, (step, loss) in zip(palette, sorted(per_step.items())):
        ax.plot(np.arange(len(loss)), loss.numpy(), color=color, lw=1.2, label=f"step {step:,}")
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(np.arange(len(curve)), curve.numpy(), ls="--", lw=1.2, color=f"C{3 + i}", label=name)
    ax.set(xlabel="position", ylabel="loss (nats)", title="Loss by position vs in-context estimators")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120)
    return path


def plot_trajectory(traj, split: str, events: dict, path: Path) -> Path:
    """The per-example loss trajectory (:mod:`optolab.measures.trajectory`): its path on the first
    two components, coloured by sequences seen, and its speed and turning over training, with the
    loss drop's onset and end (``events``: name -> sequences) marked."""
    from optolab.measures.trajectory import speed, turning

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    pts = ax.scatter(traj.path[:, 0], traj.path[:, 1], c=traj.xs, cmap="viridis", s=10, zorder=2)
    ax.plot(traj.path[:, 0], traj.path[:, 1], color="0.7", lw=0.8, zorder=1)
    for name, x in events.items():
        i = int(np.argmin(np.abs(traj.xs - x)))
        ax.annotate(name, traj.path[i, :2], fontsize=8, xytext=(5, 5), textcoords="offset points")
        ax.plot(*traj.path[i, :2], "kx")
    fig.colorbar(pts, ax=ax, label="sequences seen")
    ev = traj.explained
    ax.set(xlabel=f"PC1 ({ev[0]:.0%})", ylabel=f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "PC2",
           title=f"Per-example loss trajectory ({split})")
    ax2.plot(traj.xs[1:], speed(traj), color="C0", label="speed (PC distance per sequence)")
    ax2.set(yscale="log", xlabel="sequences seen", ylabel="speed")
    ax2.yaxis.set_major_formatter(LogFormatter())  # plain "1e-05" labels: mathtext ones cost ~0.3 s a figure
    twin = ax2.twinx()
    twin.plot(traj.xs[1:-1], turning(traj), color="C3", lw=0.8, label="turning (degrees)")
    twin.set(ylabel="turning (degrees)", ylim=(0, 180))
    for name, x in events.items():
        ax2.axvline(x, color="k", lw=0.8, ls=":")
    ax2.set_title("Speed (blue) and turning (red) of the trajectory")
    ax2.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    fig.savefig(path, dpi=110)
    return path


def plot_llc(est: pd.DataFrame, metrics: pd.DataFrame, main_split: str, path: Path) -> Path | None:
    """The LLC over training (mean ± spread over chains) with the main split's loss on a second
    axis; restricted (per-head) LLCs in a second panel when there are any."""
    if est.empty:
        return None
    heads = sorted(t for t in est.target.unique() if t != "model")
    fig = Figure(figsize=(11 if heads else 6.5, 4), layout="constrained")
    axes = fig.subplots(1, 2 if heads else 1)
    ax = axes[0] if heads else axes
    whole = est[est.target == "model"].sort_values("sequences")
    ax.errorbar(whole.sequences, whole.llc, yerr=whole.llc_std, color="C0", marker="o", ms=3, capsize=2,
                label="LLC (whole model)")
    if "health" in whole:  # estimates whose chains are not healthy: ringed in red, with the verdict
        bad = whole[[isinstance(h, dict) and h.get("verdict") != "ok" for h in whole.health]]
        if not bad.empty:
            ax.scatter(bad.sequences, bad.llc, s=60, facecolors="none", edgecolors="red", zorder=3,
                       label="chains not ok: " + ", ".join(sorted({h["verdict"] for h in bad.health})))
    ax.set(xlabel="sequences seen", ylabel="LLC", title="Local learning coefficient")
    loss = metrics[(metrics.split == main_split) & (metrics.metric == "loss") & metrics.layer.isna()]
    if not loss.empty:
        twin = ax.twinx()
        twin.plot(loss.sequences, loss.value, color="0.5", lw=0.8, label=f"{main_split} loss")
        twin.set(ylabel=f"{main_split} loss")
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    if heads:
        for i, h in enumerate(heads):
            d = est[est.target == h].sort_values("sequences")
            axes[1].errorbar(d.sequences, d.llc, yerr=d.llc_std, color=f"C{i % 10}", marker=".", capsize=2, label=h)
        axes[1].set(xlabel="sequences seen", ylabel="restricted LLC", title="Per-head (weight-restricted) LLC")
        axes[1].legend(fontsize=7, ncol=2)
    for a in (axes if heads else [axes]):
        a.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    fig.savefig(path, dpi=110)
    return path


def plot_llc_calibration(traces: dict, table: pd.DataFrame, path: Path, tolerance: float | None = None) -> Path:
    """Every chain's loss trace for each step size (rows) × nβ (columns) of a calibration, all
    panels on one y-scale (a climb away from the checkpoint must show beside a flat trace), with
    the checkpoint's own loss (dashed), the band a healthy chain stays in (``tolerance`` nats
    above it, shaded) and the cell's LLC and verdict in its title; the recommended cell's title
    is bold."""
    sizes = sorted({k[0] for k in traces})
    betas = sorted({k[1] for k in traces})
    finite = np.concatenate([np.ravel(tr)[np.isfinite(np.ravel(tr))] for tr, _ in traces.values()] + [np.zeros(0)])
    inits = np.concatenate([np.ravel(i) for _, i in traces.values()])
    lo = float(min(finite.min(initial=np.inf), np.nanmin(inits)))
    # the top from the 99.5th percentile: one chain running off to 1e6 before it diverges must not
    # flatten every other panel
    hi = float(np.percentile(finite, 99.5)) if finite.size else lo + 1.0
    hi = max(hi, float(np.nanmax(inits)) + (tolerance or 0.0))
    pad = 0.05 * (hi - lo or 1.0)
    fig = Figure(figsize=(3.2 * len(betas), 2.4 * len(sizes)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(sizes), len(betas), squeeze=False, sharey=True))
    for i, eps in enumerate(sizes):
        for j, nb in enumerate(betas):
            ax = axes[i, j]
            tr, init = traces[(eps, nb)]
            for c in range(tr.shape[0]):
                ax.plot(tr[c], lw=0.6, color=f"C{c % 10}")
            level = float(np.mean(init))
            ax.axhline(level, color="k", ls="--", lw=0.8)
            if tolerance is not None:
                ax.axhspan(level, level + tolerance, color="0.85", zorder=0)
            row = table[(table.step_size == eps) & (table.nbeta == nb)].iloc[0]
            bold = bool(row.get("recommended", False))
            ax.set_title(f"ε {eps:.0e}, nβ {nb:.4g}: {row.llc:.3g} ({row.verdict})" + (" ← recommended" if bold else ""),
                         fontsize=8, fontweight="bold" if bold else "normal")
            ax.set_ylim(lo - pad, hi + pad)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("loss (one scale)", fontsize=8)
            if i == len(sizes) - 1:
                ax.set_xlabel("SGLD step", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


STAGE_COLOURS = {"loss falls": "#f4a582", "loss flat": "#d9d9d9", "loss flat while structure forms": "#92c5de"}


def plot_stages(signals: dict, found: list[dict], path: Path, loss: str = "loss") -> Path | None:
    """``signals``: name -> :class:`optolab.measures.stages.Signal`; ``found``: the stages."""
    if not found or loss not in signals:
        return None
    fig = Figure(figsize=(8, 5.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.2, 1])
    for ax in (top, bottom):
        seen = set()
        for st in found:
            label = st["kind"] if st["kind"] not in seen and ax is top else None
            seen.add(st["kind"])
            ax.axvspan(st["start"], st["end"], color=STAGE_COLOURS.get(st["kind"], "0.9"), alpha=0.7, lw=0, label=label)
            ax.axvline(st["start"], color="0.3", lw=0.6)
            for inner in st.get("inner_boundaries", []):
                ax.axvline(inner["at"], color="0.3", lw=0.6, ls=":")
    s = signals[loss]
    top.plot(s.xs, s.ys, color="k", lw=1.2, label="main loss")
    top.set(ylabel="loss (nats)", ylim=(0, None), title="Stages, shaded by kind (dotted: boundaries merged inside a stage)")
    top.legend(fontsize=7, loc="upper right")
    for i, (name, sig) in enumerate((n, g) for n, g in signals.items() if n != loss):
        ys = np.asarray(sig.ys, float)
        lo, hi = np.nanmin(ys), np.nanmax(ys)
        bottom.plot(sig.xs, (ys - lo) / ((hi - lo) or 1.0), lw=1, color=f"C{i}", label=f"{name} ({lo:.2g}–{hi:.2g})")
    bottom.set(xlabel="sequences seen", ylabel="signal (own range)")
    bottom.legend(fontsize=7, loc="center right")
    bottom.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    fig.savefig(path, dpi=110)
    return path
