"""``optolab report SWEEP_DIR``: tidy tables over a sweep's runs.

Rules:
- ``summary.csv``: one row per finished run — run id, condition, grid point, seed, the main
  split's phase change (onset, midpoint, end in sequences, and the plateau before it; empty
  when none was found), the first eval below loss 0.5, final loss and accuracy, and ``status``
  (``finished``, or ``failed`` for a run that diverged: its times count as "never").
- ``conditions.csv``: one row per condition × grid point, for three times — ``t05`` (the main
  loss's first crossing of 0.5, interpolated linearly between evals; ``summary.csv`` keeps the
  eval-quantised ``loss_below_0.5`` too), the phase change's ``midpoint`` and ``score_midpoint``
  (the midpoint of the rise of the run's strongest last-layer head score: ``induction_strength``,
  or ``prefix_matching`` for token tasks) — how many seeds got there, the ordinary median over
  seeds, and (with a ``reference`` condition) the per-seed *paired* ratio and difference to the
  reference at the same grid point with bootstrap 95 % CIs over the pairs, the number of pairs,
  whether the CI excludes no effect, and a warning where seeds are too few
  (:mod:`optolab.experiments.stats`; a seed that never got there is censored: later than every
  time, counted, never dropped).
- Phase changes are recomputed from each run's ``metrics.parquet`` with the installed
  detector, so one report never mixes detector versions.
- Figures (``figures/``, :mod:`optolab.experiments.report_figures`): loss curves, head-score
  trajectories, and learning times with CIs.
- ``report.md`` opens with a few sentences (what was compared, what each condition changes, the
  strongest paired effects with CIs, a warning where seeds are too few), then the design's view
  where the sweep has one (:mod:`optolab.experiments.report_designs`: a screen's heatmap and
  ranking, a window scan's critical-period curves, a dose–response curve), then both tables in
  Markdown with the figures linked; ``report.html``: the same,
  self-contained (figures embedded), to send to a colleague. Unfinished runs are listed as
  missing, never guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml

from optolab.core.errors import OptolabError
from optolab.experiments import stats
from optolab.experiments.report_designs import design_view
from optolab.experiments.report_figures import plot_report
from optolab.measures.phase import detect
from optolab.training.summary import THRESHOLDS, head_score, phase_change


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
        loss = m[(m.split == main) & (m.metric == "loss")].sort_values("step")
        crossing = stats.crossing_time(loss.sequences.to_numpy(), loss.value.to_numpy(), THRESHOLDS["0.5"])
        rows.append({"run": rid, "condition": info["condition"], "group": info["group"],
                     **{f"grid.{k}": v for k, v in info["point"].items()}, "seed": info["seed"],
                     "status": s.get("status", "finished"), "stopped": (s.get("stopped") or {}).get("reason"),
                     "onset": pc.get("onset"), "midpoint": pc.get("midpoint"), "end": pc.get("end"),
                     "plateau": pc.get("plateau"), "loss_below_0.5": t05.get("sequences"),
                     "t05": crossing.time, "t05_censored_at": crossing.censored_at,
                     "final_loss": final.get("loss"), "final_acc": final.get("acc"),
                     "last": float(loss.sequences.max()) if len(loss) else None,
                     "readout": (s.get("readout") or {}).get("model"), **_score_rise(m, main)})
    return meta, pd.DataFrame(rows), missing, metrics


TIMES = {"t05": "loss below 0.5", "midpoint": "the phase change's midpoint",
         "score_midpoint": "the induction score's rise"}


def condition_table(meta: dict, df: pd.DataFrame) -> pd.DataFrame:
    """Per condition × grid point, for each time of :data:`TIMES` (``t05``: the main loss's
    first crossing of 0.5, interpolated between evals; ``midpoint``; ``score_midpoint``): how
    many seeds reached it, the ordinary median over seeds and, against the ``reference``
    condition at the same grid point, the per-seed *paired* ratio and difference (same seed,
    other condition) with bootstrap CIs over the pairs (:mod:`optolab.experiments.stats`; a seed
    that never got there is censored, not dropped)."""
    reference = meta["sweep"].get("reference")
    out: dict[str, dict] = {}
    for name in TIMES:
        if name not in df:
            continue
        # a run that never got there is censored at its last eval (the loss crossing's own, else the run's)
        after = df["t05_censored_at"] if name == "t05" and "t05_censored_at" in df else df.get("last")
        runs = [{"condition": r.condition, "group": r.group, "seed": r.seed, "t": r.t, "after": a}
                for r, a in zip(df[["condition", "group", "seed", name]].rename(columns={name: "t"})
                                .itertuples(index=False), [None] * len(df) if after is None else after)]
        for row in stats.effects_table(runs, reference, "t", censored_key="after"):
            cell = out.setdefault(row["group"], {"group": row["group"], "condition": row["condition"],
                                                 "seeds": row["n_seeds"]})
            cell.update({f"{name}_found": row["n_crossed"], f"{name}_median": row["median"]})
            if "ratio" in row:
                cell.update({f"{name}_ratio": row["ratio"], f"{name}_ratio_ci_low": row["ratio_ci_low"],
                             f"{name}_ratio_ci_high": row["ratio_ci_high"], f"{name}_diff": row["difference"],
                             f"{name}_diff_ci_low": row["difference_ci_low"],
                             f"{name}_diff_ci_high": row["difference_ci_high"],
                             f"{name}_resolved": row["ratio_resolved"], f"{name}_pairs": row["n_pairs"],
                             f"{name}_censored": row["n_censored"],
                             f"{name}_censored_reference": row["n_censored_reference"],
                             f"{name}_ratio_low": row["ratio_low"], f"{name}_ratio_high": row["ratio_high"],
                             f"{name}_warning": row["warning"]})
    return pd.DataFrame(list(out.values()))


def clamp_words(sweep_dir: Path, df: pd.DataFrame, meta: dict | None = None) -> dict[str, str]:
    """What each condition changes, in a few words: its own protocol file and ``set``
    overrides (from ``sweep.json``), and its clamps (from its first run's resolved protocol)."""
    conditions = {c["name"]: c for c in ((meta or {}).get("sweep", {}).get("conditions") or [])}
    design = (meta or {}).get("sweep", {}).get("design") or {}
    dosed = design.get("field") if design.get("kind") == "dose" else None  # a dose names its value
    clamps: dict[str, list[str]] = {}
    for condition, g in df.groupby("condition", sort=False):
        try:
            data = yaml.safe_load((sweep_dir / g.run.iloc[0] / "protocol.yaml").read_text())
        except (OSError, yaml.YAMLError):
            data = {}
        clamps[condition] = [_clamp_text(c, dosed) for c in data.get("clamps") or []]
    # clamps every condition has (a base protocol's) are said once, under the key "" (see opening)
    common = [c for c in next(iter(clamps.values()), []) if all(c in v for v in clamps.values())] \
        if len(clamps) > 1 else []
    words = {"": "; ".join(common)} if common else {}
    for condition, own in clamps.items():
        spec = conditions.get(condition, {})
        parts = [f"protocol {spec['protocol']}"] if spec.get("protocol") else []
        parts += [f"{k} = {v}" for k, v in (spec.get("set") or {}).items()]
        extra = [c for c in own if c not in common]
        parts.append("clamps: " + "; ".join(extra) if extra else ("no other clamp" if common else "no clamp"))
        words[condition] = ", ".join(parts)
    return words


def _clamp_text(c: dict, field: str | None = None) -> str:
    where = c.get("site") or c.get("param") or (f"layer {c['layer']}" if "layer" in c else "")
    heads = f" heads {c['heads']}" if c.get("heads") is not None else ""
    what = f" to {c['to']}" if "to" in c else ""
    value: object = c
    for part in (field or "").split(".") if field else []:
        value = value.get(part) if isinstance(value, dict) else None
    if field and value is not None:
        what += f", {field} = {value}"
    w = c.get("window") or {}
    when = "" if not w or (w.get("start", 0) == 0 and w.get("stop") is None) else \
        f" during [{w.get('start', 0):g}, {w['stop'] if w.get('stop') is not None else 'end'}) {w.get('unit', '')}"
    return f"{c.get('kind')} {where}{heads}{what}{when}".replace("  ", " ").strip()


def opening(meta: dict, df: pd.DataFrame, cond: pd.DataFrame, words: dict[str, str]) -> list[str]:
    """The report's first sentences: what was compared, what each condition changed, the
    strongest effects with their CIs, and a warning where seeds are too few to resolve them."""
    reference = meta["sweep"].get("reference")
    seeds = sorted(df.seed.unique().tolist())
    lines = [f"This sweep compares {cond.condition.nunique()} conditions"
             + (f" at {cond.group.nunique() // max(cond.condition.nunique(), 1)} grid points" if any(
                 c.startswith("grid.") for c in df.columns) else "")
             + f" over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
             + (f", each against '{reference}' on the same seeds." if reference else "."), ""]
    if words.get(""):
        lines += [f"Every condition has: {words['']}. Beyond that:", ""]
    lines += [f"- **{c}**: {words.get(c, '?')}" for c in cond.condition.unique()]
    lines += ["", *readout_lines(df)]
    if reference and "t05_ratio" in cond:
        lines += ["", *effect_lines(cond[cond.condition != reference])]
        lines += censoring_lines(df, reference)
        warned = sorted({w for w in cond.get("t05_warning", pd.Series(dtype=object)).dropna()
                         if "cannot say" not in w})
        if warned:
            lines += ["", "**Warning:** " + warned[0]]
    lines += ["", stats.INTERPOLATION_NOTE] + stopped_note(df)
    return lines


def stopped_note(df: pd.DataFrame) -> list[str]:
    """A sentence on runs stopped at their answer (optolab.training.stopping), if any."""
    reasons = df["stopped"].dropna() if "stopped" in df else pd.Series(dtype=object)
    if reasons.empty:
        return []
    answered, capped = int((reasons == "answered").sum()), int((reasons == "cap").sum())
    return [f"{answered + capped} of {len(df)} runs stopped before their budget: {answered} once their question was "
            f"answered (the crossing and a margin of evals seen), {capped} at the cap without crossing — those are "
            "censored at their last eval (later than every time), never dropped. Final values of stopped runs are "
            "at their stop, not at the budget."]


def readout_lines(df: pd.DataFrame) -> list[str]:
    """Which model the times and final values were read on (``summary.json``'s ``readout``), in
    one sentence, with a warning where evals inside a window read the clamp's output."""
    models = df.groupby("condition", sort=False)["readout"].first() if "readout" in df else pd.Series(dtype=object)
    if models.empty or models.isna().any():
        return ["**Readout:** not recorded for some runs (written by an older optolab): their evals may read "
                "a clamped model; re-run them to know."]
    windowed = [c for c, m in models.items() if m == "clamped inside windows"]
    throughout = [c for c, m in models.items() if m == "clamped"]
    if windowed:
        return [f"**Readout warning:** in {len(windowed)} condition(s) ({', '.join(windowed[:6])}"
                + (", …" if len(windowed) > 6 else "") + ") evals inside a clamp's window read the clamped model "
                "(`apply_at: both` or `eval`), so their times and final values include the clamp's direct effect "
                "on the readout, not only its effect on learning. Set `apply_at: train` to read the model "
                "training made (window scans do by default)."]
    if throughout and len(throughout) == len(models):
        where = "; in every condition a clamp acts at every eval (the clamped model is the condition's model)"
    elif throughout:
        where = (f"; in {', '.join(throughout[:6])}" + (", …" if len(throughout) > 6 else "")
                 + " a clamp acts at every eval, so the condition is the clamped model")
    else:
        where = ""
    return ["**Readout:** times and final values are read on the model training made (no eval reads a clamp "
            "for part of the run)" + where + "."]


def effect_lines(eff: pd.DataFrame, top: int = 5) -> list[str]:
    """The strongest paired effects on the time to loss 0.5 as sentences: a verb only for a
    resolved effect; a null or unresolved one says so; a censored one says it cannot be said."""
    said = []
    for row in eff.itertuples(index=False):
        pairs = int(row.t05_pairs) if not pd.isna(row.t05_pairs) else 0
        ci = f"95 % CI [{_num(row.t05_ratio_ci_low)}, {_num(row.t05_ratio_ci_high)}]"
        if pd.isna(row.t05_ratio):
            low, high = getattr(row, "t05_ratio_low", None), getattr(row, "t05_ratio_high", None)
            if not pairs:
                continue
            why = f"some seeds never got there (paired over {pairs} seeds, {int(row.t05_censored)} censored; {ci})"
            near = low if low is not None and low > 1 else high if high is not None and high < 1 else 1.0
            if row.t05_resolved:
                verb = "delays" if near > 1 else "speeds up"
                text = (f"- '{row.group}' {verb} the drop below loss 0.5 by a factor between {_num(low)} and "
                        f"{_num(high)}: only bounds, because {why}.")
            else:
                text = (f"- '{row.group}': cannot say — the ratio of times to loss 0.5 is only bounded, between "
                        f"{_num(low)} and {_num(high)}, because {why}.")
            said.append((not row.t05_resolved, -abs(math.log(near)) if near > 0 else -math.inf, text))
            continue
        size = abs(math.log(row.t05_ratio)) if row.t05_ratio > 0 else math.inf
        if row.t05_resolved:
            verb = "delays" if row.t05_ratio > 1 else "speeds up"
            text = f"- '{row.group}' {verb} the drop below loss 0.5 by a factor {row.t05_ratio:.3g} (paired over " \
                   f"{pairs} seeds; {ci})."
        else:
            text = f"- '{row.group}': time to loss 0.5 × {row.t05_ratio:.3g} the reference's (paired over {pairs} " \
                   f"seeds; {ci}), not resolved from no effect."
        said.append((not row.t05_resolved, -size, text))
    return [t for *_, t in sorted(said, key=lambda x: x[:2])[:top]]


def censoring_lines(df: pd.DataFrame, reference: str) -> list[str]:
    """How many runs never got to loss 0.5, the reference's said apart (they bound every ratio)."""
    never = df[df["t05"].isna()]
    if never.empty:
        return []
    ref = never[never.condition == reference]
    return ["", f"**Censoring:** {len(never)} of {len(df)} runs never got below loss 0.5 by their last eval"
            + (f", {len(ref)} of them the reference's (seed(s) {', '.join(map(str, sorted(ref.seed)))})" if len(ref)
               else "")
            + ". A pair with a side that never got there bounds its ratio instead of giving one (a run that "
              "never crossed would have crossed after its last eval), so a median it reaches is reported as "
              "bounds (or 'cannot say'), never as a number."]


def compact(cond: pd.DataFrame) -> pd.DataFrame:
    """The per-condition table for reading: counts, medians and paired ratios with their CIs."""
    out = cond[["group", "seeds"]].copy()
    for name in TIMES:
        if f"{name}_median" not in cond:
            continue
        out[f"{name} found"] = cond[f"{name}_found"]
        out[f"{name} median"] = cond[f"{name}_median"]
        if f"{name}_ratio" in cond:
            low = cond.get(f"{name}_ratio_low", pd.Series([None] * len(cond), index=cond.index))
            high = cond.get(f"{name}_ratio_high", pd.Series([None] * len(cond), index=cond.index))
            out[f"{name} ratio [95 % CI]"] = [
                ("" if pd.isna(pairs) or not pairs else f"cannot say: {_num(a)} to {_num(b)} [{_num(lo)}, {_num(hi)}]")
                if pd.isna(r) else f"{r:.3g} [{_num(lo)}, {_num(hi)}]" + ("" if ok is True else " (n.r.)")
                for r, lo, hi, ok, a, b, pairs in zip(
                    cond[f"{name}_ratio"], cond[f"{name}_ratio_ci_low"], cond[f"{name}_ratio_ci_high"],
                    cond[f"{name}_resolved"], low, high, cond[f"{name}_pairs"])]
    return out


def _num(v) -> str:
    return "unbounded" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.3g}"


def clamp_windows(sweep_dir: Path, df: pd.DataFrame) -> dict[str, list[tuple[float, float | None]]]:
    """Each group's clamp windows in sequences (``[start, stop)``, stop None: to the end), for
    shading; clamps that act throughout are left out."""
    out: dict[str, list] = {}
    for group, g in df.groupby("group", sort=False):
        try:
            data = yaml.safe_load((sweep_dir / g.run.iloc[0] / "protocol.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        bs = data.get("train", {}).get("batch_size", 1)
        for c in data.get("clamps") or []:
            w = c.get("window") or {}
            if not w or (w.get("start", 0) == 0 and w.get("stop") is None):
                continue
            per = bs if w.get("unit") == "steps" else 1
            stop = w.get("stop")
            out.setdefault(group, []).append((w.get("start", 0) * per, None if stop is None else stop * per))
    return out


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
    windows = clamp_windows(sweep_dir, df)
    images = plot_report(sweep_dir, df, cond, metrics, windows)
    design_images, design_lines = design_view(sweep_dir, meta, df, cond, windows)
    intro = opening(meta, df, cond, clamp_words(sweep_dir, df, meta))
    lines = [f"# Sweep {meta['sweep']['name']}", "", *intro, "", *design_lines, "",
             f"{len(df)} finished runs" + (f"; missing: {', '.join(missing)}" if missing else "") + ".", "",
             "## Per condition", "",
             "Sequences to the main loss's first crossing of 0.5 (t05, interpolated), to the phase change's "
             "midpoint and to the induction score's rise: seeds that got there, the median, and the paired "
             "ratio to the reference with its 95 % CI (every column, with differences: conditions.csv).", "",
             markdown_table(compact(cond)), "", "## Runs", "", markdown_table(df), "",
             *(f"![{img.stem}](figures/{img.name})" for img in images)]
    paths[2].write_text("\n".join(lines) + "\n")
    done = f"{len(df)} finished runs" + (f"; missing: {', '.join(missing)}" if missing else "") + "."
    paths[3].write_text(_html([("Per condition (sequences)", " ".join(intro) + " " + done), ("Runs", "")],
                              [cond, df], images, f"Sweep {meta['sweep']['name']}"))
    return paths + design_images + images
