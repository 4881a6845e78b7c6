"""The figures of ``optolab report`` (seaborn, written to ``SWEEP_DIR/figures/``).

- ``loss_curves.png``: main-split loss per condition, the median over seeds with the seeds'
  range as a band, phase-change onsets as ticks on the x axis.
- ``head_scores.png``: head-score trajectories of the four heads with the highest final score
  (median over runs) per row. Top row: the last layer's induction-type score (the first
  measure's ``induction`` curve the runs have: ``induction_strength``, or ``prefix_matching``
  for token tasks); bottom row, where measured: the first layer's previous-token-type score.
  Lines are medians over seeds per condition, bands the seeds' range.
- ``times.png``: the main loss's first crossing of 0.5 (interpolated between evals) per
  condition: seeds as dots, the ordinary median in red; seeds that never crossed as crosses at
  their last eval (censored).
- ``effects.png`` (with a reference): each condition's paired ratio to the reference on the same
  seeds, with its bootstrap 95 % CI, on a log axis (1: no effect).
- ``survival.png``: per condition, the fraction of seeds not yet below loss 0.5 against
  sequences (Kaplan–Meier: seeds that never crossed stay in, censored at their last eval).
- Every loss and score plot shades each condition's clamp windows (clamps that act throughout
  are not shaded).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from optolab.training.summary import head_score, previous_token_score


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
        picks = [p for p in (head_score(m, main), previous_token_score(m, main)) if p is not None]
        for metric, layer in picks:
            label = f"{metric} L{layer}"
            if label not in rows:
                rows.append(label)
            sel = m[(m.split == main) & (m.metric == metric) & (m["layer"] == layer) & m["src_layer"].isna()]
            frames.append(sel[["sequences", "head", "value"]].assign(group=row.group, seed=row.seed, row=label))
    if not frames:
        return pd.DataFrame(), []
    return pd.concat(frames, ignore_index=True).astype({"head": int}), rows


def plain_log(ax, axis: str = "y") -> None:
    """Plain tick labels ("1.5", "0.8") on a log axis: matplotlib's default prints "1.5×10^0" on
    the narrow ranges paired ratios have."""
    from matplotlib.ticker import LogFormatter

    which = ax.yaxis if axis == "y" else ax.xaxis
    which.set_major_formatter(LogFormatter())
    which.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _strongest_heads(rows: pd.DataFrame, k: int = 4) -> list[int]:
    """The ``k`` heads with the highest final score (median over every run): the heads worth a
    panel; 16 panels × 6 conditions of flat lines were unreadable."""
    last = rows[rows.sequences == rows.groupby(["group", "seed"]).sequences.transform("max")]
    return [int(h) for h in last.groupby("head").value.median().nlargest(k).index]


def _shade(ax, windows: dict, palette: dict) -> None:
    for group, spans in windows.items():
        for start, stop in spans:
            ax.axvspan(start, stop if stop is not None else ax.get_xlim()[1], color=palette.get(group, "0.5"),
                       alpha=0.08, lw=0)


def plot_report(sweep_dir: Path, df: pd.DataFrame, cond: pd.DataFrame,
                metrics: dict[str, tuple[str, pd.DataFrame]], windows: dict | None = None) -> list[Path]:
    """The figures; ``metrics`` is each run's ``(main split, metrics table)`` from the report,
    ``windows`` each group's clamp windows in sequences (shaded)."""
    import seaborn as sns

    windows = windows or {}
    figs = sweep_dir / "figures"
    figs.mkdir(exist_ok=True)
    palette = dict(zip(cond["group"], sns.color_palette(n_colors=len(cond))))
    made = [_loss_figure(figs, df, metrics, windows, palette), _scores_figure(figs, df, metrics, windows, palette),
            _times_figure(figs, df, cond), _effects_figure(figs, cond), _survival_figure(figs, df, palette)]
    return [p for p in made if p is not None]


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.savefig(path, dpi=dpi)
    return path


def _loss_figure(figs: Path, df: pd.DataFrame, metrics: dict, windows: dict, palette: dict) -> Path:
    import seaborn as sns
    from matplotlib.figure import Figure

    curves = _loss_curves(metrics, df)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=curves, x="sequences", y="value", hue="group", palette=palette, estimator="median",
                 errorbar=("pi", 100), ax=ax, lw=1.3)
    for row in df.itertuples(index=False):
        if not pd.isna(row.onset):
            ax.axvline(row.onset, ymax=0.04, color=palette.get(row.group, "k"), lw=1.5)
    _shade(ax, windows, palette)
    ax.set(yscale="log", ylabel="main-split loss (median over seeds; band: range)", xlabel="sequences seen",
           title="Loss per condition (ticks: phase-change onsets; shaded: clamp windows)")
    plain_log(ax)
    ax.legend(fontsize=7, title="condition")
    return _save(fig, figs / "loss_curves.png")


def _scores_figure(figs: Path, df: pd.DataFrame, metrics: dict, windows: dict, palette: dict) -> Path | None:
    """``head_scores.png``, where the runs measured a head score."""
    from matplotlib.figure import Figure

    scores, rows = _score_curves(metrics, df)
    if not rows:
        return None
    picked = {label: _strongest_heads(scores[scores.row == label]) for label in rows}
    width = max(len(h) for h in picked.values())
    fig = Figure(figsize=(2.6 * width + 1, 2.3 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), width, sharex=True, sharey="row", squeeze=False)
    for r, label in enumerate(rows):
        for c in range(width):
            if c >= len(picked[label]):
                axes[r][c].set_visible(False)
                continue
            head = picked[label][c]
            _score_panel(axes[r][c], scores[(scores.row == label) & (scores["head"] == head)], f"{label} H{head}",
                         windows, palette, legend=(r == c == 0))
    if axes[0][0].get_legend() is not None:
        axes[0][0].legend(fontsize=6, title=None)
    fig.suptitle(f"Head-score trajectories of the {width} heads with the highest final score per row "
                 "(median over seeds; band: range)", fontsize=10)
    fig.supxlabel("sequences seen", fontsize=8)
    return _save(fig, figs / "head_scores.png", dpi=100)


def _score_panel(ax, part: pd.DataFrame, title: str, windows: dict, palette: dict, legend: bool) -> None:
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    if not part.empty:
        sns.lineplot(data=part, x="sequences", y="value", hue="group", palette=palette,
                     estimator="median", errorbar=("pi", 100), ax=ax, lw=1, legend=legend)
        _shade(ax, windows, palette)
    ax.set(title=title, xlabel="", ylabel="")
    ax.title.set_fontsize(8)
    ax.tick_params(labelsize=6)
    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))


def _times_figure(figs: Path, df: pd.DataFrame, cond: pd.DataFrame) -> Path:
    import seaborn as sns
    from matplotlib.figure import Figure

    order = list(cond["group"])
    fig = Figure(figsize=(6.5, 0.45 * len(cond) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    crossed = df[df.t05.notna()]
    sns.stripplot(data=crossed, y="group", x="t05", order=order, ax=ax, color="0.4", size=5, jitter=0.1)
    never = df[df.t05.isna() & df.t05_censored_at.notna()]
    ax.scatter(never.t05_censored_at, [order.index(g) for g in never.group], marker="x", color="0.4",
               label="never crossed (at its last eval)")
    for i, row in enumerate(cond.itertuples(index=False)):
        if row.t05_median is not None and not pd.isna(row.t05_median):
            ax.plot(row.t05_median, i, "o", color="C3")
    if len(never):
        ax.legend(fontsize=7)
    ax.set(xlabel="sequences to loss < 0.5, interpolated (dots: seeds; red: median)", ylabel="",
           title="Learning time per condition")
    return _save(fig, figs / "times.png")


def _effects_figure(figs: Path, cond: pd.DataFrame) -> Path | None:
    """``effects.png``, where the report has paired ratios (a reference)."""
    from matplotlib.figure import Figure

    if "t05_ratio" not in cond or not cond.t05_ratio.notna().any():
        return None
    eff = cond[cond.t05_ratio.notna()]
    fig = Figure(figsize=(6.5, 0.45 * len(eff) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    for i, row in enumerate(eff.itertuples(index=False)):
        lo = row.t05_ratio_ci_low if not pd.isna(row.t05_ratio_ci_low) else row.t05_ratio
        hi = row.t05_ratio_ci_high if not pd.isna(row.t05_ratio_ci_high) else row.t05_ratio
        ax.errorbar(row.t05_ratio, i, xerr=[[row.t05_ratio - lo], [hi - row.t05_ratio]], fmt="o",
                    color="C3" if row.t05_resolved else "0.6", capsize=4)
    ax.axvline(1, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(eff)), list(eff.group))
    ax.set(xscale="log", xlabel="time to loss < 0.5 ÷ the reference's, paired by seed (95 % CI; grey: "
           "not resolved)", title="Effect on learning time")
    plain_log(ax, "x")
    return _save(fig, figs / "effects.png")


def _survival_figure(figs: Path, df: pd.DataFrame, palette: dict) -> Path:
    from matplotlib.figure import Figure

    from optolab.experiments import stats

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for group, g in df.groupby("group", sort=False):
        curve = stats.survival(list(g.t05.where(g.t05.notna(), None)), list(g.t05_censored_at))
        xs, ys = [0.0], [1.0]
        for x, y in curve:
            xs += [x, x]
            ys += [ys[-1], y]
        ax.plot(xs, ys, color=palette.get(group, "k"), label=group, lw=1.3)
    ax.set(xlabel="sequences seen", ylabel="fraction of seeds not yet below loss 0.5",
           title="Transition times (Kaplan–Meier; never-crossing seeds censored)", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    return _save(fig, figs / "survival.png")
