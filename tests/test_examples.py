"""The worked example runs top to bottom (with a few thousand sequences, so it stays fast) and
produces what it promises: figures, the head-score table, an ablation and the TransformerLens
model."""

from __future__ import annotations

import runpy

from tests.conftest import ROOT


def test_the_quickstart_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTOLAB_WALKTHROUGH_SEQUENCES", "3200")
    monkeypatch.setenv("OPTOLAB_WALKTHROUGH_OUT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(ROOT / "examples" / "quickstart_walkthrough.py"), run_name="__main__")
    for figure in ("loss.png", "induction_head_patterns.png"):
        assert (tmp_path / figure).stat().st_size > 0, figure
    scores = names["scores"]
    assert list(scores.columns) == ["step", "sequences", "split", "layer", "head", "metric", "value"]
    assert set(scores.metric) == {"induction_strength", "prev_token"} and scores.layer.nunique() == 2
    assert len(names["around"]) >= 2 and names["loss_ablated"] != names["loss_clean"]
    assert (names["logits"] - names["clean"]).abs().max().item() <= 1e-5
