"""The figures of ``optolab report`` (seaborn, written to ``SWEEP_DIR/figures/``).

- ``loss_curves.png``: main-split loss per condition, the median over seeds with the seeds'
  range as a band, phase-change onsets as ticks on the x axis.
- ``head_scores.png``: head-score trajectories, one panel per head. Top row: the
  induction-type score of the last layer (``induction_strength``, or ``prefix_matching`` for
  token tasks); bottom row, where measured: layer 0's ``prev_token`` score. Lines are medians
  over seeds per condition, bands the seeds' range.
- ``times.png``: first eval below loss 0.5 per condition, seeds as dots, the median with its
  bootstrap 95 % CI.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from optolab.training.summary import head_score


def _loss_curves(metrics: dict, df: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for row in df.itertuples(index=False):
        main, m = metrics[row.run]
        loss = m[(m.split == main) & (m.metric == "loss")][["sequences", "value"]]
        frames.append(loss.assign(group=row.group, seed=row.seed))
    return pd.concat(frames, ignore_index=True)


def _score_curves(metrics: dict, df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Long table (group, seed, row, head, sequences, value) for the head-score panels."""
    frames, rows = [], []
    for row in df.itertuples(index=False):
        main, m = metrics[row.run]
        picks = []
        found = head_score(m, main)
        if found is not None:
            picks.append((found[0], found[1]))
        if not m[(m.split == main) & (m.metric == "prev_token")].empty:
            picks.append(("prev_token", 0))
        for metric, layer in picks:
            label = f"{metric} L{layer}"
            if label not in rows:
                rows.append(label)
            sel = m[(m.split == main) & (m.metric == metric) & (m["layer"] == layer) & m["src_layer"].isna()]
            frames.append(sel[["sequences", "head", "value"]].assign(group=row.group, seed=row.seed, row=label))
    if not frames:
        return pd.DataFrame(), []
    return pd.concat(frames, ignore_index=True).astype({"head": int}), rows


def plot_report(sweep_dir: Path, df: pd.DataFrame, cond: pd.DataFrame,
                metrics: dict[str, tuple[str, pd.DataFrame]]) -> list[Path]:
    """The figures; ``metrics`` is each run's ``(main split, metrics table)`` from the report."""
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figs = sweep_dir / "figures"
    figs.mkdir(exist_ok=True)
    palette = dict(zip(cond["group"], sns.color_palette(n_colors=len(cond))))
    paths = []

    curves = _loss_curves(metrics, df)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=curves, x="sequences", y="value", hue="group", palette=palette, estimator="median",
                 errorbar=("pi", 100), ax=ax, lw=1.3)
    for row in df.itertuples(index=False):
        if not pd.isna(row.onset):
            ax.axvline(row.onset, ymax=0.04, color=palette.get(row.group, "k"), lw=1.5)
    ax.set(yscale="log", ylabel="main-split loss (median over seeds; band: range)", xlabel="sequences seen",
           title="Loss per condition (ticks: phase-change onsets)")
    ax.legend(fontsize=7, title="condition")
    paths.append(figs / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)

    scores, rows = _score_curves(metrics, df)
    if rows:
        heads = sorted(scores["head"].unique())
        fig = Figure(figsize=(1.9 * len(heads) + 1, 2.0 * len(rows) + 0.8), layout="constrained")
        axes = fig.subplots(len(rows), len(heads), sharex=True, sharey="row", squeeze=False)
        for r, label in enumerate(rows):
            for c, head in enumerate(heads):
                ax = axes[r][c]
                part = scores[(scores.row == label) & (scores["head"] == head)]
                if not part.empty:
                    sns.lineplot(data=part, x="sequences", y="value", hue="group", palette=palette,
                                 estimator="median", errorbar=("pi", 100), ax=ax, lw=1, legend=(r == c == 0))
                ax.set(title=f"{label} H{head}" if r == 0 or c == 0 else f"H{head}", xlabel="", ylabel="")
                ax.title.set_fontsize(8)
                ax.tick_params(labelsize=6)
                ax.xaxis.set_major_locator(MaxNLocator(3))
                ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        if axes[0][0].get_legend() is not None:
            axes[0][0].legend(fontsize=6, title=None)
        fig.suptitle("Head-score trajectories (median over seeds; band: range)", fontsize=10)
        fig.supxlabel("sequences seen", fontsize=8)
        paths.append(figs / "head_scores.png")
        fig.savefig(paths[-1], dpi=100)

    fig = Figure(figsize=(6.5, 0.45 * len(cond) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    sns.stripplot(data=df, y="group", x="loss_below_0.5", ax=ax, color="0.4", size=5, jitter=0.1)
    for i, row in enumerate(cond.itertuples(index=False)):
        if row.t05_median is not None and not pd.isna(row.t05_median):
            lo = row.t05_ci_low if not pd.isna(row.t05_ci_low) else row.t05_median
            hi = row.t05_ci_high if not pd.isna(row.t05_ci_high) else row.t05_median
            ax.errorbar(row.t05_median, i, xerr=[[row.t05_median - lo], [hi - row.t05_median]], fmt="o",
                        color="C3", capsize=4)
    ax.set(xlabel="sequences to loss < 0.5 (dots: seeds; red: median, 95 % CI)", ylabel="",
           title="Learning time per condition")
    paths.append(figs / "times.png")
    fig.savefig(paths[-1], dpi=110)
    return paths
