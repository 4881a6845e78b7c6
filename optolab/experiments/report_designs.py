"""Report views for sweep designs (:mod:`optolab.experiments.designs`): what a screen, a window
scan or a dose–response found, as a figure and a few lines for ``report.md``.

Rules:
- Every number comes from the report's per-condition table (:func:`optolab.experiments.report.condition_table`):
  the paired ratio of the time to loss 0.5 (interpolated) to the design's reference on the same
  seeds, with its bootstrap CI. Conditions are matched to design cells by name (a screen's
  ``<intervention>_L<layer>H<head>``, a dose's ``<prefix>_<value>``) or, for a window scan, by
  the clamp window its runs recorded.
- ``screen``: a heatmap of the ratio per target × intervention (CIs in the cells; only resolved
  effects coloured, the rest grey), beside the paired difference of the final induction-type
  score, and a table ranked from the most delaying to the most speeding up. A censored cell
  ("cannot say") ranks by the bound nearest no effect and shows its bounds.
- ``window_scan``: the ratio against the window's start, one line per window length with its CI
  band; the reference's drop (median onset to end of its phase change) is shaded.
- ``dose``: the ratio against the dose, with its CI band.
- A sweep without a design, or whose conditions cannot be matched, gets no view (never a guess).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from optolab.experiments import stats
from optolab.experiments.report_figures import plain_log

HEAD_CELL = re.compile(r"^(?P<what>.+)_L(?P<layer>\d+)H(?P<head>\d+)$")


def _ci(lo, hi) -> str:
    def num(v) -> str:
        return "∞" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
    return f"[{num(lo)}, {num(hi)}]"


def _score_effects(df: pd.DataFrame, reference: str) -> dict[str, dict]:
    """Per condition, the paired difference of the final induction-type score to the reference."""
    if "score_final" not in df:
        return {}
    ref = df[df.condition == reference].set_index("seed")["score_final"].to_dict()
    out = {}
    for condition, g in df[df.condition != reference].groupby("condition", sort=False):
        # a score is always there; "never" does not apply, so NaN (no score) drops the seed
        mine = {s: v for s, v in g.set_index("seed")["score_final"].items() if not pd.isna(v)}
        theirs = {s: v for s, v in ref.items() if not pd.isna(v)}
        if mine and theirs:
            out[condition] = stats.paired_effect(mine, theirs, kind="difference")
    return out


def _ratio_or_bounds(row) -> tuple[float | None, tuple | None]:
    """A condition's paired ratio of the time to loss 0.5, or (censored: "cannot say") ``None``
    with the bounds it lies in; ``(None, None)`` when it has no pairs."""
    ratio = getattr(row, "t05_ratio", float("nan"))
    if not pd.isna(ratio):
        return float(ratio), (float(ratio), float(ratio))
    low, high = getattr(row, "t05_ratio_low", None), getattr(row, "t05_ratio_high", None)
    if low is None or pd.isna(low):  # no pairs: nothing to bound (a ratio's lower bound is never -inf)
        return None, None
    return None, (float(low), math.inf if high is None or pd.isna(high) else float(high))


def _rank_value(ratio: float | None, bounds: tuple) -> float:
    """What a cell ranks by: its ratio, or the bound nearest no effect (the least it can be)."""
    if ratio is not None:
        return ratio
    low, high = bounds
    return low if low > 1 else high if high < 1 else 1.0


def _ratio_text(r) -> str:
    if not pd.isna(r.ratio):
        return f"{r.ratio:.3g} {_ci(r.lo, r.hi)}"
    low, high = r.bounds
    span = f"{low:.3g}–{'∞' if math.isinf(high) else f'{high:.3g}'}"
    return (f"between {span} (censored)" if r.resolved else f"cannot say: {span} (censored)") + f" {_ci(r.lo, r.hi)}"


def screen_view(figs: Path, meta: dict, df: pd.DataFrame, cond: pd.DataFrame) -> tuple[list[Path], list[str]]:
    reference = meta["sweep"].get("reference")
    cells = []
    for row in cond.itertuples(index=False):
        m = HEAD_CELL.match(str(row.condition))
        ratio, bounds = _ratio_or_bounds(row)
        if m and bounds is not None:
            cells.append({"what": m["what"], "target": f"L{m['layer']}H{m['head']}", "condition": row.condition,
                          "ratio": ratio, "rank": _rank_value(ratio, bounds), "bounds": bounds,
                          "lo": row.t05_ratio_ci_low, "hi": row.t05_ratio_ci_high,
                          "resolved": bool(row.t05_resolved)})
    if not cells:
        return [], []
    cells = pd.DataFrame(cells)
    scores = _score_effects(df, reference)
    cells["score_diff"] = [scores.get(c, {}).get("effect") for c in cells.condition]
    from matplotlib.figure import Figure

    whats = list(dict.fromkeys(cells.what))
    targets = list(dict.fromkeys(cells.target))
    fig = Figure(figsize=(2.2 * len(whats) * 2 + 1.5, 0.45 * len(targets) + 1.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (col, title, cmap, centre) in zip(axes, [
            ("ratio", "time to loss < 0.5 ÷ reference (paired)", "RdBu_r", 0.0),
            ("score_diff", "final induction score − reference", "PuOr", 0.0)]):
        # only resolved effects get a colour (the legend's grey means "CI includes no effect")
        shade = cells.assign(ratio=[r if ok else math.nan for r, ok in zip(cells["rank"], cells.resolved)]) \
            if col == "ratio" else cells
        grid = shade.pivot(index="target", columns="what", values=col).reindex(index=targets, columns=whats)
        values = grid.astype(float)
        shown = values.map(lambda v: math.log(v) if col == "ratio" and v and v > 0 else v)
        lim = max(float(shown.abs().max().max()), 1e-6) if shown.notna().any().any() else 1.0
        import matplotlib

        colours = matplotlib.colormaps[cmap].with_extremes(bad="0.9")
        ax.imshow(shown.to_numpy(), cmap=colours, vmin=centre - lim, vmax=centre + lim, aspect="auto")
        for i, t in enumerate(targets):
            for j, w in enumerate(whats):
                c = cells[(cells.target == t) & (cells.what == w)]
                if c.empty or (col != "ratio" and pd.isna(c.iloc[0][col])):
                    continue
                r = c.iloc[0]
                if col == "ratio":
                    text = (f"{r.ratio:.2g}" if not pd.isna(r.ratio) else
                            f"≥{r.bounds[0]:.2g}" if r.bounds[0] > 1 else f"≤{r.bounds[1]:.2g}") + f"\n{_ci(r.lo, r.hi)}"
                else:
                    text = f"{r[col]:.2g}"
                dark = not pd.isna(shown.loc[t, w]) and abs(shown.loc[t, w]) > 0.55 * lim  # light text on dark
                faint = col == "ratio" and not r.resolved
                color = ("0.8" if faint else "white") if dark else ("0.45" if faint else "k")
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
        ax.set_xticks(range(len(whats)), whats)
        ax.set_yticks(range(len(targets)), targets)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Screen: paired effects per target × intervention (grey: CI includes no effect)", fontsize=10)
    path = figs / "screen.png"
    fig.savefig(path, dpi=110)
    ranked = cells.sort_values("rank", ascending=False)
    lines = ["## Screen", "", "Paired effects on the time to loss < 0.5 (÷ the reference's, paired by seed, 95 % "
             "CI), from the most delaying to the most speeding up; 'resolved' says whether the CI excludes no "
             "effect; final induction-type score − the reference's:", "",
             "| rank | condition | ratio [CI] | resolved | score difference |", "|---|---|---|---|---|"]
    for k, r in enumerate(ranked.itertuples(index=False), 1):
        diff = "" if r.score_diff is None or pd.isna(r.score_diff) else f"{r.score_diff:+.2f}"
        lines.append(f"| {k} | {r.condition} | {_ratio_text(r)} | {'yes' if r.resolved else 'no'} | {diff} |")
    return [path], lines + ["", f"![screen](figures/{path.name})"]


def _reference_drop(df: pd.DataFrame, reference: str) -> tuple[float, float] | None:
    ref = df[df.condition == reference]
    onset, end = ref["onset"].dropna(), ref["end"].dropna()
    return (float(onset.median()), float(end.median())) if len(onset) and len(end) else None


def window_view(figs: Path, meta: dict, df: pd.DataFrame, cond: pd.DataFrame,
                windows: dict) -> tuple[list[Path], list[str]]:
    reference = meta["sweep"].get("reference")
    rows = []
    for row in cond.itertuples(index=False):
        spans = windows.get(row.group) or []
        if len(spans) != 1 or pd.isna(getattr(row, "t05_ratio", float("nan"))):
            continue
        start, stop = spans[0]
        rows.append({"start": start, "length": (stop - start) if stop is not None else math.inf,
                     "ratio": row.t05_ratio, "lo": row.t05_ratio_ci_low, "hi": row.t05_ratio_ci_high,
                     "condition": row.condition, "resolved": bool(row.t05_resolved)})
    if not rows:
        return [], []
    rows = pd.DataFrame(rows).sort_values(["length", "start"])
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    drop = _reference_drop(df, reference)
    if drop:
        ax.axvspan(*drop, color="0.85", lw=0, label=f"'{reference}' loss drop (median onset–end)")
    for k, (length, g) in enumerate(rows.groupby("length", sort=True)):
        lo = g.lo.fillna(g.ratio).astype(float)
        hi = g.hi.astype(float).fillna(float(g.ratio.max()) * 10)
        ax.plot(g.start, g.ratio, "o-", color=f"C{k}", label=f"window of {length:.3g} sequences")
        ax.fill_between(g.start, lo, hi, color=f"C{k}", alpha=0.15, lw=0)
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.set(yscale="log", xlabel="window start (sequences)", ylabel="time to loss < 0.5 ÷ reference (paired)",
           title="Critical period: the clamp's effect by when it acts")
    plain_log(ax)
    ax.legend(fontsize=7)
    path = figs / "window_scan.png"
    fig.savefig(path, dpi=110)
    lines = ["## Window scan", "", "The clamp's paired effect on the time to loss < 0.5 by window (95 % CI):", "",
             "| window start | length | ratio [CI] | resolved |", "|---|---|---|---|"]
    lines += [f"| {r.start:.3g} | {r.length:.3g} | {r.ratio:.3g} {_ci(r.lo, r.hi)} | {'yes' if r.resolved else 'no'} |"
              for r in rows.itertuples(index=False)]
    if drop:
        lines += ["", f"The reference's loss drops between {drop[0]:.3g} and {drop[1]:.3g} sequences (median "
                  "onset and end of its phase change)."]
    return [path], lines + ["", f"![window scan](figures/{path.name})"]


def dose_view(figs: Path, meta: dict, cond: pd.DataFrame) -> tuple[list[Path], list[str]]:
    design = meta["sweep"].get("design") or {}
    prefix = design.get("prefix") or "dose"
    rows = []
    for row in cond.itertuples(index=False):
        name = str(row.condition)
        if not name.startswith(prefix + "_") or pd.isna(getattr(row, "t05_ratio", float("nan"))):
            continue
        try:
            dose = float(name[len(prefix) + 1:])
        except ValueError:
            continue
        rows.append({"dose": dose, "ratio": row.t05_ratio, "lo": row.t05_ratio_ci_low, "hi": row.t05_ratio_ci_high,
                     "resolved": bool(row.t05_resolved)})
    if not rows:
        return [], []
    rows = pd.DataFrame(rows).sort_values("dose")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(rows.dose, rows.ratio, "o-", color="C3")
    ax.fill_between(rows.dose, rows.lo.fillna(rows.ratio).astype(float),
                    rows.hi.astype(float).fillna(float(rows.ratio.max()) * 10), color="C3", alpha=0.15, lw=0)
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.set(yscale="log", xlabel=design.get("field", "dose"), ylabel="time to loss < 0.5 ÷ reference (paired)",
           title="Dose–response")
    plain_log(ax)
    path = figs / "dose.png"
    fig.savefig(path, dpi=110)
    lines = ["## Dose–response", "", f"| {design.get('field', 'dose')} | ratio [CI] | resolved |", "|---|---|---|"]
    lines += [f"| {r.dose:g} | {r.ratio:.3g} {_ci(r.lo, r.hi)} | {'yes' if r.resolved else 'no'} |"
              for r in rows.itertuples(index=False)]
    return [path], lines + ["", f"![dose](figures/{path.name})"]


def design_view(sweep_dir: Path, meta: dict, df: pd.DataFrame, cond: pd.DataFrame,
                windows: dict) -> tuple[list[Path], list[str]]:
    """The view of the sweep's design (see the module rules): figures written and report lines."""
    kind = (meta["sweep"].get("design") or {}).get("kind")
    figs = sweep_dir / "figures"
    figs.mkdir(exist_ok=True)
    if kind == "screen":
        return screen_view(figs, meta, df, cond)
    if kind == "window_scan":
        return window_view(figs, meta, df, cond, windows)
    if kind == "dose":
        return dose_view(figs, meta, cond)
    return [], []
