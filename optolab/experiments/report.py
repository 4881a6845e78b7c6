"""``optolab report SWEEP_DIR``: tidy tables over a sweep's runs.

Rules:
- ``summary.csv``: one row per finished run — run id, condition, grid point, seed, the main
  split's phase change (onset, midpoint, end in sequences, and the plateau before it; empty
  when none was found), the first eval below loss 0.5, final loss and accuracy, and ``status``
  (``finished``, or ``failed`` for a run that diverged: its times count as "never").
- ``conditions.csv``: one row per condition × grid point, for two times — the phase change's
  midpoint and the first eval below loss 0.5 (``t05``, which exists also for runs that drop
  without a plateau) — how many seeds have it, the median with a bootstrap 95 % CI, and (with
  a ``reference`` condition) the ratio of medians to the reference at the same grid point with
  its CI (:mod:`optolab.measures.phase`; "never" counts as later than everything).
  The same for ``score_midpoint``: the midpoint of the rise of the run's strongest last-layer
  head score (``induction_strength``, or ``prefix_matching`` for token tasks; ``score`` names
  the head) — when the induction head forms, beside when the loss drops.
- Phase changes are recomputed from each run's ``metrics.parquet`` with the installed
  detector, so one report never mixes detector versions.
- Figures (``figures/``, :mod:`optolab.experiments.report_figures`): loss curves, head-score
  trajectories, and learning times with CIs.
- ``report.md``: both tables in Markdown with the figures linked; ``report.html``: the same,
  self-contained (figures embedded), to send to a colleague. Unfinished runs are listed as
  missing, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from optolab.core.errors import OptolabError
from optolab.experiments.report_figures import plot_report
from optolab.measures.phase import detect, ratio, summarize_times
from optolab.training.summary import head_score, phase_change


def _score_rise(m: pd.DataFrame, split: str) -> dict:
    """The rise of the strongest final head's score (onset/midpoint in sequences), if any."""
    found = head_score(m, split)
    if found is None:
        return {}
    metric, layer = found
    rows = m[(m.split == split) & (m.metric == metric) & (m["layer"] == layer) & m["src_layer"].isna()]
    last = rows[rows.step == rows.step.max()]
    head = int(last.loc[last.value.idxmax(), "head"])
    curve = rows[rows["head"] == head].sort_values("step")
    event = detect(curve.sequences.to_numpy(), curve.value.to_numpy(), direction="up").event
    return {"score": f"{metric} L{layer}H{head}", "score_final": float(curve.value.iloc[-1]),
            "score_onset": event.onset if event else None, "score_midpoint": event.midpoint if event else None}


def run_rows(sweep_dir: Path) -> tuple[dict, pd.DataFrame, list[str], dict[str, tuple[str, pd.DataFrame]]]:
    """One row per finished run, the missing runs, and each run's ``(main split, metrics)``
    (read once, for the figures too). Phase changes are recomputed from ``metrics.parquet``
    with the installed detector, so a report never mixes detector versions."""
    meta_path = sweep_dir / "sweep.json"
    if not meta_path.is_file():
        raise OptolabError(f"'{sweep_dir}' has no sweep.json.", field="SWEEP_DIR",
                           fix="give the --out folder of an `optolab sweep` run.")
    meta = json.loads(meta_path.read_text())
    rows, missing, metrics = [], [], {}
    for rid, info in meta["runs"].items():
        path = sweep_dir / rid / "summary.json"
        if not path.is_file():
            missing.append(rid)
            continue
        s = json.loads(path.read_text())
        main = s["main_split"]
        m = pd.read_parquet(sweep_dir / rid / "metrics.parquet")
        metrics[rid] = (main, m)
        pc = phase_change(m, main) or {}
        t05 = s.get("time_to_loss_0.5") or {}
        final = s.get("final", {}).get(main, {})  # a diverged run has none
        rows.append({"run": rid, "condition": info["condition"], "group": info["group"],
                     **{f"grid.{k}": v for k, v in info["point"].items()}, "seed": info["seed"],
                     "status": s.get("status", "finished"),
                     "onset": pc.get("onset"), "midpoint": pc.get("midpoint"), "end": pc.get("end"),
                     "plateau": pc.get("plateau"), "loss_below_0.5": t05.get("sequences"),
                     "final_loss": final.get("loss"), "final_acc": final.get("acc"),
                     **_score_rise(m, main)})
    return meta, pd.DataFrame(rows), missing, metrics


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
        times = [("midpoint", "midpoint"), ("loss_below_0.5", "t05")]
        if "score_midpoint" in df:
            times.append(("score_midpoint", "score_midpoint"))
        for col, name in times:
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
    meta, df, missing, metrics = run_rows(sweep_dir)
    if df.empty:
        raise OptolabError(f"no finished runs in '{sweep_dir}'.", field="SWEEP_DIR",
                           fix="run `optolab sweep` to completion first (it resumes).")
    cond = condition_table(meta, df)
    paths = [sweep_dir / "summary.csv", sweep_dir / "conditions.csv", sweep_dir / "report.md",
             sweep_dir / "report.html"]
    df.to_csv(paths[0], index=False)
    cond.to_csv(paths[1], index=False)
    images = plot_report(sweep_dir, df, cond, metrics)
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
