"""Stop at the answer (optolab.training.stopping): a stopped run's metric rows are the full run's
rows up to its stop, it is censored (not dropped) at a cap, it resumes to its full budget
bit-identically, and ensemble members stop on their own."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from optolab.protocol.loader import validate_protocol
from optolab.training.ensemble import train_ensemble
from optolab.training.stopping import StopRule
from optolab.training.trainer import train

from .conftest import fewshot_protocol

STEPS = 60
TOLERANCE = 1e-5  # ensemble members against solo runs (tests/test_ensemble.py)


def _protocol(stop=None, seed=0):
    data = fewshot_protocol(steps=STEPS)
    data["seeds"] = {"init": seed, "data": seed, "eval": 1}
    if stop is not None:
        data["train"]["stop"] = stop
    return validate_protocol(data)


def _rows(path) -> pd.DataFrame:
    m = pd.read_parquet(path / "metrics.parquet")
    return m.sort_values(["step", "split", "metric", "layer", "head"], na_position="first").reset_index(drop=True)


MAIN = "fsl_train"  # the fewshot task's main split


def _loss(m: pd.DataFrame, step: int) -> float:
    return float(m[(m.split == MAIN) & (m.metric == "loss") & (m.step == step)].value.iloc[0])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(_protocol(), out, progress=False)
    return out


def test_stopped_rows_equal_full_rows_and_resume_to_full_budget(full, tmp_path):
    m = _rows(full)
    threshold = _loss(m, 20) + 1e-6  # crossed at the eval of step 20 (the curve falls before it)
    assert _loss(m, 10) > threshold
    out = tmp_path / "stopped"
    train(_protocol({"threshold": threshold, "margin_evals": 1}), out, progress=False)
    s = json.loads((out / "summary.json").read_text())
    assert s["main_split"] == MAIN
    assert s["status"] == "stopped" and s["stopped"]["reason"] == "answered" and s["stopped"]["step"] == 30
    stopped = _rows(out)
    assert stopped.step.max() == 30
    pd.testing.assert_frame_equal(stopped, m[m.step <= 30].reset_index(drop=True))
    assert s["time_to_loss_0.5"] == json.loads((full / "summary.json").read_text())["time_to_loss_0.5"] or \
        _loss(m, 30) >= 0.5  # the crossing the question asked about is read from the same rows

    train(_protocol(), out, progress=False)  # the same protocol without the rule: on to the budget
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    pd.testing.assert_frame_equal(_rows(out), m)  # bit-identical with the uninterrupted run


def test_same_rule_again_is_refused_as_finished(full, tmp_path):
    from optolab.core.errors import OptolabError

    stop = {"threshold": _loss(_rows(full), 20) + 1e-6, "margin_evals": 0}
    train(_protocol(stop), tmp_path / "r", progress=False)
    with pytest.raises(OptolabError, match="finished run"):
        train(_protocol(stop), tmp_path / "r", progress=False)


def test_cap_stops_uncrossed_run_as_censored(tmp_path):
    out = tmp_path / "capped"
    train(_protocol({"threshold": -1.0, "cap_sequences": 20 * 16}), out, progress=False)
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped"] == {"reason": "cap", "step": 20, "sequences": 320, "budget_steps": STEPS}
    assert s["time_to_loss_0.5"] is None

    from optolab.experiments.stats import crossing_time

    m = _rows(out)
    loss = m[(m.split == MAIN) & (m.metric == "loss")]
    c = crossing_time(loss.sequences.to_numpy(), loss.value.to_numpy(), -1.0)
    assert c.time is None and c.censored_at == 320  # never crossed: censored at the cap's eval, kept


def test_score_rule_best_head_rising():
    class Spec:
        metric, split, threshold, direction, layer, margin_evals, cap_sequences = "prev_token", None, 0.5, "up", 0, 2, None

    rule = StopRule(Spec, "test")
    row = lambda v, layer=0: {"split": "test", "metric": "prev_token", "layer": layer, "head": 0, "value": v}  # noqa: E731
    assert rule.update(10, 100, [row(0.1), row(0.9, layer=1)]) is None  # another layer's head does not count
    assert rule.update(20, 200, [row(0.6), row(0.2)]) is None and rule.crossed_at == 20
    assert rule.update(30, 300, [row(0.1)]) is None
    assert rule.update(40, 400, [row(0.1)]) == "answered"


def test_ensemble_members_stop_alone(full, tmp_path):
    m = _rows(full)
    early = {"threshold": _loss(m, 20) + 1e-6, "margin_evals": 1}
    protocols = [_protocol(early, seed=0), _protocol(None, seed=1)]
    outs = [tmp_path / "a", tmp_path / "b"]
    train_ensemble(protocols, outs)
    a, b = (json.loads((o / "summary.json").read_text()) for o in outs)
    assert a["status"] == "stopped" and a["stopped"]["step"] == 30
    assert b["status"] == "finished" and b["final_step"] == STEPS
    got = _rows(outs[0])
    want = m[m.step <= 30].reset_index(drop=True)
    assert (got[["step", "split", "metric"]] == want[["step", "split", "metric"]]).all().all()
    assert (got.value - want.value).abs().max() < TOLERANCE
