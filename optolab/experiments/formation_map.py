"""The formation map: ``OUT/formation_map.md`` of an ``optolab discover`` run, written from its
``discover.json`` alone (so it can be rewritten without training anything).

Rules:
- It opens with the question and what was found, in sentences; then **what matters** (every
  confirmed effect: screen and confirmation ratios with 95 % CIs, pairs, censored pairs, the
  screen's Holm verdict), **when** (each searched window: latest start and earliest stop as
  fractions of the reference's event time and in sequences, with the bisection's bracket),
  **how much** (the dose table), **unresolved and why** (open at the seed cap, screen effects
  not confirmed, nulls within the margin), and **compute per stage** (runs' CPU-minutes and wall
  minutes).
- Ratios are condition time / reference time of the question's crossing: above 1 a delay.
  A CI end that is unbounded (censored seeds) prints as ∞.
"""

from __future__ import annotations

from pathlib import Path

from optolab.training.rundir import write_atomic


def _num(v) -> str:
    return "∞" if v is None else f"{v:.3g}"


def _ci(v: dict) -> str:
    """``ratio [CI]``; a median that censoring reaches prints as the bounds it lies between."""
    lo, hi = v["ci"]
    ci = f"[{'0' if lo is None else _num(lo)}, {_num(hi)}]"
    if v["ratio"] is None:
        b = v.get("bounds") or [None, None]
        return f"cannot say (censored; median in [{'0' if b[0] is None else _num(b[0])}, {_num(b[1])}]) {ci}"
    return f"{_num(v['ratio'])} {ci}"


def _what_matters(stages: dict) -> list[str]:
    screen = stages.get("screen", {}).get("verdicts", {})
    confirm = stages.get("confirm", {}).get("verdicts", {})
    rows = ["| condition | screen ratio [95 % CI] | screen pairs | Holm (screen) | confirmation ratio [95 % CI] | "
            "pairs (censored) | verdict |", "|---|---|---|---|---|---|---|"]
    for n, v in sorted(confirm.items(), key=lambda nv: not nv[1].get("confirmed")):
        s = screen[n]
        rows.append(f"| {n} | {_ci(s)} | {s['n_pairs']} | {'survives' if s['holm'] else 'does not'} | {_ci(v)} | "
                    f"{v['n_pairs']} ({v['n_censored']}) | {'confirmed ' + v['direction'] if v.get('confirmed') else v['verdict']} |")
    return rows if confirm else ["No condition reached the confirmation stage."]


def _when(stage: dict) -> list[str]:
    if not stage.get("searches"):
        return [f"Not searched: {stage.get('skipped', 'no confirmed effect')}."]
    t, rel = stage["t_event"], stage["relative_to"]
    rows = [f"Windows in units of the reference's {rel} T = {t:,.0f} sequences (median of {len(stage['seeds'])} "
            "seeds); a window holds when its median paired ratio moves the time by at least "
            f"{next(iter(stage['searches'].values()))['effect']:.0%} in the confirmed direction.", "",
            "| condition | latest start (T) | bracket | earliest stop (T) | bracket | probes |", "|---|---|---|---|---|---|"]
    for n, s in stage["searches"].items():
        a, b = s["latest_start"], s["earliest_stop"]
        rows.append(f"| {n} | {a['value']:.3g} ({a['value'] * t:,.0f} seq) | [{a['bracket'][0]:.3g}, "
                    f"{a['bracket'][1]:.3g}] | {b['value']:.3g} ({b['value'] * t:,.0f} seq) | [{b['bracket'][0]:.3g}, "
                    f"{b['bracket'][1]:.3g}] | {len(a['probes']) + len(b['probes'])} |")
    known = [f"{n}: a start from {k['start_fails']:.3g} T fails (every probe seed's reference had crossed), "
             f"a stop from {k['stop_holds']:.3g} T holds (every whole-clamp run had crossed)"
             for n, s in stage["searches"].items() if (k := s.get("known")) and
             (k["start_fails"] < s["hi"] or k["stop_holds"] < s["hi"])]
    if known:
        rows += ["", "Known without a probe, so the brackets started there: " + "; ".join(known) + "."]
    return rows


def _how_much(stage: dict) -> list[str]:
    if not stage.get("doses"):
        return [f"No dose: {stage.get('skipped', 'not run')}."]
    rows = [f"`{stage['condition']}` with `{stage['field']}` at each value, paired with the confirmation's reference:",
            "", "| value | ratio [95 % CI] | pairs (censored) |", "|---|---|---|"]
    rows += [f"| {k} | {_ci(v)} | {v['n_pairs']} ({v['n_censored']}) |" for k, v in stage["doses"].items()]
    return rows


def _unresolved(stages: dict) -> list[str]:
    screen = stages.get("screen", {}).get("verdicts", {})
    confirm = stages.get("confirm", {}).get("verdicts", {})
    out = []
    for n, v in screen.items():
        if v["verdict"] == "open":
            out.append(f"- {n}: open after {v['n_pairs']} pairs ({'seed cap reached' if v['at_cap'] else 'stopped'}): "
                       f"ratio {_ci(v)} neither excludes 1 nor lies within the null margin.")
        elif v["verdict"] == "effect" and not confirm.get(n, {}).get("confirmed"):
            c = confirm.get(n)
            out.append(f"- {n}: an effect in the screen ({_ci(v)}) not confirmed on fresh seeds"
                       + (f" ({_ci(c)}, {c['verdict']})." if c else "."))
    for name in ("screen", "confirm"):
        if stages.get(name, {}).get("budget_reached"):
            out.append(f"- the {name} stopped adding seeds at the discovery's budget (budget.max_runs).")
    nulls = [n for n, v in screen.items() if v["verdict"] == "null"]
    if nulls:
        out.append(f"- resolved nulls (ratio CI within the margin): {', '.join(nulls)}.")
    return out or ["Nothing: every condition resolved."]


def _compute(stages: dict) -> list[str]:
    rows = ["| stage | CPU-min (runs) | wall min | note |", "|---|---|---|---|"]
    for name, s in stages.items():
        rows.append(f"| {name} | {s.get('compute_s', 0) / 60:.1f} | {s.get('wall_s', 0) / 60:.1f} | "
                    f"{s.get('skipped', '') or (str(s.get('rounds')) + ' round(s)' if 'rounds' in s else '')} |")
    total = sum(s.get("compute_s", 0) for s in stages.values()) / 60
    rows.append(f"| total | {total:.1f} | {sum(s.get('wall_s', 0) for s in stages.values()) / 60:.1f} | |")
    return rows


def write_map(record: dict, spec, out: Path) -> Path:
    stages = record.get("stages", {})
    screen = stages.get("screen", {}).get("verdicts", {})
    confirmed = [n for n, v in stages.get("confirm", {}).get("verdicts", {}).items() if v.get("confirmed")]
    counts = {k: sum(v["verdict"] == k for v in screen.values()) for k in ("effect", "null", "open")}
    q = spec.question
    lines = [f"# Formation map: {record.get('name', spec.name)}", "",
             f"Question: when does the main loss first fall to {q.loss}? Each condition's time is compared with the "
             f"reference (the base protocol, no extra clamp) seed by seed (ratio of times; above 1 a delay). Runs "
             f"stop {q.margin_evals} evals after the crossing; runs of other conditions that have not crossed by "
             f"{q.cap}× the reference's median crossing are censored there (counted as later than every time).", "",
             f"The screen tested {len(screen)} conditions: {counts['effect']} effect(s), {counts['null']} null(s) within "
             f"±{spec.margin:.0%}, {counts['open']} open. Confirmed on fresh seeds: "
             f"{', '.join(confirmed) if confirmed else 'none'}.", "",
             "## What matters", "", *_what_matters(stages), "",
             "## When", "", *_when(stages.get("windows", {})), "",
             "## How much", "", *_how_much(stages.get("dose", {})), "",
             "## Unresolved and why", "", *_unresolved(stages), "",
             "## Screen, every condition", "", "| condition | ratio [95 % CI] | pairs | p (signed-rank) | Holm | verdict |",
             "|---|---|---|---|---|---|",
             *[f"| {n} | {_ci(v)} | {v['n_pairs']} | {v['p']:.3g} | {'survives' if v['holm'] else '—'} | {v['verdict']} |"
               for n, v in screen.items()], "",
             "## Compute per stage", "", *_compute(stages), ""]
    path = out / "formation_map.md"
    write_atomic(path, "\n".join(lines))
    return path
