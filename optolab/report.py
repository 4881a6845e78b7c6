"""``optolab report SWEEP_DIR``: tidy tables over a sweep's runs.

Rules:
- ``summary.csv``: one row per finished run — run id, condition, grid point, seed, the main
  split's phase change (onset, midpoint, end in sequences, and the plateau before it; empty
  when none was found), the first eval below loss 0.5, final loss and accuracy.
- ``conditions.csv``: one row per condition × grid point, for two times — the phase change's
  midpoint and the first eval below loss 0.5 (``t05``, which exists also for runs that drop
  without a plateau) — how many seeds have it, the median with a bootstrap 95 % CI, and (with
  a ``reference`` condition) the ratio of medians to the reference at the same grid point with
  its CI (:mod:`optolab.phase`; "never" counts as later than everything).
- Figures (``figures/``): ``loss_curves.png`` (main-split loss per condition, median over
  seeds with the seeds' range as a band, phase-change onsets as ticks) and ``times.png``
  (first eval below 0.5 per condition: seeds as dots, median with its bootstrap CI).
- ``report.md``: both tables in Markdown with the figures linked; ``report.html``: the same,
  self-contained (figures embedded), to send to a colleague. Unfinished runs are listed as
  missing, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from optolab.errors import OptolabError
from optolab.phase import ratio, summarize_times


def run_rows(sweep_dir: Path) -> tuple[dict, pd.DataFrame, list[str]]:
    meta_path = sweep_dir / "sweep.json"
    if not meta_path.is_file():
        raise OptolabError(f"'{sweep_dir}' has no sweep.json.", field="SWEEP_DIR",
                           fix="give the --out folder of an `optolab sweep` run.")
    meta = json.loads(meta_path.read_text())
    rows, missing = [], []
    for rid, info in meta["runs"].items():
        path = sweep_dir / rid / "summary.json"
        if not path.is_file():
            missing.append(rid)
            continue
        s = json.loads(path.read_text())
        main = s["main_split"]
        pc = s.get("phase_change") or {}
        t05 = s.get("time_to_loss_0.5") or {}
        rows.append({"run": rid, "condition": info["condition"], "group": info["group"],
                     **{f"grid.{k}": v for k, v in info["point"].items()}, "seed": info["seed"],
                     "onset": pc.get("onset"), "midpoint": pc.get("midpoint"), "end": pc.get("end"),
                     "plateau": pc.get("plateau"), "loss_below_0.5": t05.get("sequences"),
                     "final_loss": s["final"][main]["loss"], "final_acc": s["final"][main].get("acc")})
    return meta, pd.DataFrame(rows), missing


def _times(values: pd.Series) -> list[float | None]:
    return [None if pd.isna(v) else float(v) for v in values]


def condition_table(meta: dict, df: pd.DataFrame) -> pd.DataFrame:
    """Per condition × grid point, for two times: the phase change's ``midpoint`` and the first
    eval below loss 0.5 (``t05``, Singh et al.'s measure; defined also without a plateau)."""
    reference = meta["sweep"].get("reference")
    out = []
    for group, g in df.groupby("group", sort=False):
        condition = g["condition"].iloc[0]
        row = {"group": group, "condition": condition, "seeds": len(g)}
        ref = df[df.group == reference + group[len(condition):]] if reference is not None else df.iloc[:0]
        for col, name in (("midpoint", "midpoint"), ("loss_below_0.5", "t05")):
            st = summarize_times(_times(g[col]))
            row.update({f"{name}_found": st["n_found"], f"{name}_median": st["median"],
                        f"{name}_ci_low": st["ci_low"], f"{name}_ci_high": st["ci_high"]})
            if len(ref):
                r = ratio(_times(g[col]), _times(ref[col]))
                row.update({f"{name}_ratio": r["ratio"], f"{name}_ratio_ci_low": r["ci_low"],
                            f"{name}_ratio_ci_high": r["ci_high"]})
        out.append(row)
    return pd.DataFrame(out)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers to 4 significant digits, blanks for missing)."""
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _curves(sweep_dir: Path, df: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for row in df.itertuples(index=False):
        m = pd.read_parquet(sweep_dir / row.run / "metrics.parquet")
        main = json.loads((sweep_dir / row.run / "summary.json").read_text())["main_split"]
        loss = m[(m.split == main) & (m.metric == "loss")][["sequences", "value"]]
        frames.append(loss.assign(group=row.group, seed=row.seed))
    return pd.concat(frames, ignore_index=True)


def plot_report(sweep_dir: Path, df: pd.DataFrame, cond: pd.DataFrame) -> list[Path]:
    import seaborn as sns
    from matplotlib.figure import Figure

    figs = sweep_dir / "figures"
    figs.mkdir(exist_ok=True)
    curves = _curves(sweep_dir, df)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=curves, x="sequences", y="value", hue="group", estimator="median",
                 errorbar=("pi", 100), ax=ax, lw=1.3)
    palette = dict(zip(cond["group"], sns.color_palette(n_colors=len(cond))))
    for row in df.itertuples(index=False):
        if not pd.isna(row.onset):
            ax.axvline(row.onset, ymax=0.04, color=palette.get(row.group, "k"), lw=1.5)
    ax.set(yscale="log", ylabel="main-split loss (median over seeds; band: range)", xlabel="sequences seen",
           title="Loss per condition (ticks: phase-change onsets)")
    ax.legend(fontsize=7, title="condition")
    loss_path = figs / "loss_curves.png"
    fig.savefig(loss_path, dpi=110)

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
    times_path = figs / "times.png"
    fig.savefig(times_path, dpi=110)
    return [loss_path, times_path]


def _html(markdown_sections: list[tuple[str, str]], tables: list[pd.DataFrame], images: list[Path],
          title: str) -> str:
    import base64
    import html

    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse;"
             "font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}</style>", f"<h1>{html.escape(title)}</h1>"]
    for (heading, text), table in zip(markdown_sections, tables):
        parts += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(text)}</p>",
                  table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")]
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        parts.append(f"<p><img alt='{img.stem}' src='data:image/png;base64,{data}' style='max-width:100%'></p>")
    return "\n".join(parts) + "\n"


def write_report(sweep_dir: str | Path) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    meta, df, missing = run_rows(sweep_dir)
    if df.empty:
        raise OptolabError(f"no finished runs in '{sweep_dir}'.", field="SWEEP_DIR",
                           fix="run `optolab sweep` to completion first (it resumes).")
    cond = condition_table(meta, df)
    paths = [sweep_dir / "summary.csv", sweep_dir / "conditions.csv", sweep_dir / "report.md",
             sweep_dir / "report.html"]
    df.to_csv(paths[0], index=False)
    cond.to_csv(paths[1], index=False)
    images = plot_report(sweep_dir, df, cond)
    lines = [f"# Sweep {meta['sweep']['name']}", "",
             f"{len(df)} finished runs" + (f"; missing: {', '.join(missing)}" if missing else "") + ".", "",
             "## Per condition (sequences; midpoint of the phase change, and first eval below loss 0.5)", "",
             markdown_table(cond), "", "## Runs", "", markdown_table(df), "",
             *(f"![{img.stem}](figures/{img.name})" for img in images)]
    paths[2].write_text("\n".join(lines) + "\n")
    done = f"{len(df)} finished runs" + (f"; missing: {', '.join(missing)}" if missing else "") + "."
    paths[3].write_text(_html([("Per condition (sequences)", done), ("Runs", "")], [cond, df], images,
                              f"Sweep {meta['sweep']['name']}"))
    return paths + images
