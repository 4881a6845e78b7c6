"""Print what a token_corpus run learned: loss and ICL score over training, the phase change, the
heads (previous-token, prefix matching on repeated random tokens) and the loss by position.

    python scripts/corpus_report.py RUN_DIR [RUN_DIR ...] [--posthoc RUN_DIR/posthoc/NAME.csv]
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

import optolab


def _at(df: pd.DataFrame, split: str, metric: str) -> pd.Series:
    rows = df[(df.split == split) & (df.metric == metric) & df.layer.isna()]
    return rows.set_index("step")["value"]


def report(path: str) -> None:
    run = optolab.open_run(path)
    df = run.metrics
    summary = run.summary if run.dir.summary.is_file() else {}  # a stopped run has none yet
    print(f"== {path} ({run.protocol.name}; evals up to step {int(df.step.max())})")
    table = pd.DataFrame({"val loss": _at(df, "val", "loss"), "val icl_score": _at(df, "val", "icl_score"),
                          "rr loss": _at(df, "repeated_random", "loss"),
                          "rr icl_score": _at(df, "repeated_random", "icl_score")})
    heads = run.head_scores(["prefix_matching", "prev_token"], split="repeated_random")
    best = heads.groupby(["step", "metric", "layer"])["value"].max().unstack(["metric", "layer"])
    best.columns = [f"max {m} L{layer}" for m, layer in best.columns]
    print(table.join(best).round(3).to_string())
    print("phase change (sequences):", summary.get("phase_change"))
    print("stages:", [(round(s["start"]), round(s["end"]), s["kind"]) for s in summary.get("stages") or []])
    last = heads[heads.step == heads.step.max()]
    print(last.pivot_table(index=["metric", "layer"], columns="head", values="value").round(3).to_string())
    # the ICL score again at every checkpoint on 1,024 windows (the eval's 128 windows leave one
    # position's loss with a noise and a fixed-content offset of a few tenths on text)
    early, late = summary.get("icl_positions") or (12, 124)
    rows = {}
    for split in ("val", "repeated_random"):
        for step, curve in run.loss_by_position(split, n=1024).items():
            rows.setdefault(step, {})[f"{split} icl_score (1024)"] = float(curve[late] - curve[early])
            rows[step][f"{split} loss[{late}]"] = float(curve[late])
            if split == "val" and step in (run.checkpoint_steps[1], run.checkpoint_steps[-1]):
                at = [0, 1, 2, 4, 8, 16, 32, 64, 127]
                print(f"val loss by position, step {step}: " + " ".join(
                    f"[{p}]{float(curve[p]):.2f}" for p in at if not math.isnan(float(curve[p]))))
    print(pd.DataFrame(rows).T.round(3).to_string())


def posthoc(path: str) -> None:
    df = pd.read_csv(path)
    whole = df[df.layer.isna() & df.metric.isin(["loss", "icl_score"])]
    print(whole.pivot_table(index="condition", columns=["split", "metric"], values="value").round(3).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--posthoc", nargs="*", default=[])
    args = parser.parse_args()
    for path in args.runs:
        report(path)
    for path in args.posthoc:
        posthoc(path)


if __name__ == "__main__":
    main()
