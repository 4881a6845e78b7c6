"""``measures.splits``: a run that evaluates only some splits (as ``optolab discover``'s runs do,
with every measure off) has the same training and the same rows on those splits as a run that
evaluates everything; splits it cannot evaluate are refused before anything is written."""

from __future__ import annotations

import pandas as pd
import pytest

from optolab.core.errors import OptolabError
from optolab.experiments.discover import DiscoverSpec, run_set
from optolab.measures.registry import measures
from optolab.protocol.loader import validate_protocol
from optolab.training.trainer import train

from .conftest import ROOT, fewshot_protocol

MAIN = "fsl_train"


def _rows(path) -> pd.DataFrame:
    m = pd.read_parquet(path / "metrics.parquet")
    return m.sort_values(["step", "split", "metric", "layer", "head"], na_position="first").reset_index(drop=True)


def test_lean_evals_keep_the_main_splits_rows_and_training(tmp_path):
    full = tmp_path / "full"
    train(validate_protocol(fewshot_protocol(steps=30)), full, progress=False)
    lean_data = fewshot_protocol(steps=30)
    lean_data["measures"].update({"splits": [MAIN], "per_example": False, **{n: False for n in measures()}})
    lean = tmp_path / "lean"
    train(validate_protocol(lean_data), lean, progress=False)

    f, g = _rows(full), _rows(lean)
    assert set(f.split) > {MAIN}  # the task has other splits, and the full run measured them
    assert set(g.split) == {MAIN, "train_batches"}  # the eval split and the training batches' own loss
    assert set(g[g.split == MAIN].metric) == {"loss", "acc", "icl_acc"}
    same = f[f.split.isin(set(g.split)) & f.metric.isin(set(g.metric))].reset_index(drop=True)
    pd.testing.assert_frame_equal(g, same)
    assert not (lean / "per_example").exists()


@pytest.mark.parametrize("splits, field", [(["nope"], "measures.splits"), (["fsl_test_class"], "measures.splits")])
def test_splits_the_run_cannot_evaluate_are_refused(splits, field):
    data = fewshot_protocol()
    data["measures"]["splits"] = splits
    with pytest.raises(OptolabError) as e:
        validate_protocol(data)
    assert e.value.field == field


def test_a_stop_rule_on_a_split_not_evaluated_is_refused():
    data = fewshot_protocol(stop={"split": "fsl_test_class"})
    data["measures"]["splits"] = [MAIN]
    with pytest.raises(OptolabError) as e:
        validate_protocol(data)
    assert e.value.field == "train.stop.split"


def test_discover_runs_evaluate_the_question_only_unless_asked():
    base = str(ROOT / "protocols" / "quickstart.yaml")
    spec = dict(name="x", protocol=base, targets={"heads": {"layers": [0]}},
                interventions={"a": {"kind": "ablate", "site": "blocks.{layer}.attn.hook_v", "heads": ["{head}"]}})
    lean = run_set(DiscoverSpec(**spec, set={"measures.previous_token": True}), base)
    assert lean["measures.splits"] == [MAIN] and lean["measures.per_example"] is False
    assert lean["measures.previous_token"] is True  # the file's own set wins
    assert all(lean[f"measures.{n}"] is False for n in measures() if n != "previous_token")
    assert run_set(DiscoverSpec(**spec, evals="all", set={"train.compile": True}), base) == {"train.compile": True}
