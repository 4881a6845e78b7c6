"""A measure defined outside optolab (docs/measures.md's example), installed by entry point, is a
switch in ``measures:`` and writes its rows; installing it never stops an unfinished run from
resuming. Each step runs in a fresh interpreter: measures are read when the schema is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import yaml

from .conftest import ROOT, fewshot_protocol, write_protocol


def _install(site):
    """``mymeasures`` and ``mysink`` (the page's examples) and a dist-info whose entry points
    register them, on a path of its own."""
    section = (ROOT / "docs" / "measures.md").read_text().split("## Writing your own measure", 1)[1]
    (site / "mymeasures.py").write_text(section.split("```python", 1)[1].split("```", 1)[0])
    sink = [b.split("```", 1)[0] for b in section.split("```python\n")[1:] if b.startswith("# mysink.py\n")]
    assert len(sink) == 1
    (site / "mysink.py").write_text(sink[0])
    info = site / "mymeasures-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mymeasures\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[optolab.measures]\nattention_entropy = mymeasures:AttentionEntropy\nattention_sink = mysink:AttentionSink\n")


def _train(protocol, out, *, site=None, stop_after=None) -> subprocess.CompletedProcess:
    code = ("import sys; from optolab.protocol.loader import load_protocol; from optolab.training.trainer import train; "
            f"train(load_protocol({str(protocol)!r}), {str(out)!r}, progress=False, stop_after={stop_after!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site or ""), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_an_installed_measure_switches_on_and_writes_rows(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install(site)
    data = fewshot_protocol(steps=20)
    data["measures"]["attention_entropy"] = True
    result = _train(write_protocol(tmp_path, data), tmp_path / "run", site=site)
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    rows = df[df.metric == "attention_entropy"]
    splits = df[df.metric == "acc"].split.nunique()  # the eval splits ("loss" also has train_batches)
    assert len(rows) == 3 * 2 * 4 * splits  # evals × layers × heads × eval splits
    assert (rows.value >= 0).all() and (rows.value <= 2.3).all()  # at most ln(keys) ≈ ln(9)
    # without the plugin the same key is unknown: one clear line
    bad = _train(write_protocol(tmp_path, data, "bad.yaml"), tmp_path / "bad", site=None)
    assert bad.returncode != 0 and "measures.attention_entropy" in bad.stderr


def test_installing_a_measure_never_stops_a_run_from_resuming(tmp_path):
    protocol = write_protocol(tmp_path, fewshot_protocol(steps=20))
    out = tmp_path / "run"
    first = _train(protocol, out, stop_after=10)  # optolab without the plugin
    assert first.returncode == 0, first.stderr
    assert "attention_entropy" not in yaml.safe_load((out / "protocol.yaml").read_text())["measures"]
    site = tmp_path / "site"
    site.mkdir()
    _install(site)
    second = _train(protocol, out, site=site)  # the same protocol, the plugin now installed
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


LAGGED = '''
from typing import ClassVar

from pydantic import Field

from optolab.measures.measure import Measure, SplitData, model_row


class LagProbe(Measure):
    NAME: ClassVar[str] = "lag_probe"
    DEFAULT: ClassVar[bool] = False
    OPTIONS: ClassVar[dict] = {"max_lag": (int, Field(3, ge=0))}  # the name of a built-in option

    def on_split(self, d: SplitData) -> list[dict]:
        return [model_row(d.split, "lag_probe", float(self.options(d.spec).max_lag))]
'''


def test_a_plug_in_option_named_like_a_built_in_one_lives_under_its_measure(tmp_path):
    """c9baccf: a plug-in measure with an option `max_lag` (a built-in prefix_matching option)
    made `optolab validate protocols/quickstart.yaml` fail. Options of installed measures are
    namespaced under their measure: both max_lags coexist."""
    site = tmp_path / "site"
    (site / "lagprobe-0.1.dist-info").mkdir(parents=True)
    (site / "lagprobe.py").write_text(LAGGED)
    (site / "lagprobe-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: lagprobe\nVersion: 0.1\n")
    (site / "lagprobe-0.1.dist-info" / "entry_points.txt").write_text("[optolab.measures]\nlag_probe = lagprobe:LagProbe\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    shipped = subprocess.run([sys.executable, "-m", "optolab", "validate", str(ROOT / "protocols" / "quickstart.yaml")],
                             capture_output=True, text=True, env=env)
    assert shipped.returncode == 0, shipped.stderr
    data = fewshot_protocol(steps=10)
    data["measures"].update({"lag_probe": {"max_lag": 5}, "max_lag": 2})
    result = _train(write_protocol(tmp_path, data), tmp_path / "run", site=site)
    assert result.returncode == 0, result.stderr
    measures = yaml.safe_load((tmp_path / "run" / "protocol.yaml").read_text())["measures"]
    assert measures["lag_probe"] == {"max_lag": 5} and measures["max_lag"] == 2
    df = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert set(df[df.metric == "lag_probe"].value) == {5.0}
    # `true` is the plug-in's defaults; a wrong type is one line naming the namespaced field
    data["measures"]["lag_probe"] = {"max_lag": "many"}
    bad = _train(write_protocol(tmp_path, data, "bad.yaml"), tmp_path / "bad", site=site)
    assert bad.returncode != 0 and "measures.lag_probe.max_lag" in bad.stderr


def test_an_installed_measure_reads_its_option_and_reaches_the_summary(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install(site)
    runs = {}
    for keys in (1, 3):
        data = fewshot_protocol(steps=10)
        data["measures"].update(attention_sink={"sink_keys": keys})
        runs[keys] = tmp_path / f"k{keys}"
        result = _train(write_protocol(tmp_path, data, f"k{keys}.yaml"), runs[keys], site=site)
        assert result.returncode == 0, result.stderr
        assert yaml.safe_load((runs[keys] / "protocol.yaml").read_text())["measures"]["attention_sink"] == {
            "sink_keys": keys}
    one, three = (pd.read_parquet(runs[k] / "metrics.parquet") for k in (1, 3))
    one, three = (df[df.metric == "attention_sink"].value.to_numpy() for df in (one, three))
    assert len(one) == len(three) > 0 and (one <= 1 + 1e-6).all()
    assert (three >= one - 1e-6).all() and (three > one + 1e-3).any()  # more keys hold more attention
    final = json.loads((runs[1] / "summary.json").read_text())["final"]
    assert any("attention_sink" in metrics for metrics in final.values())
    data = fewshot_protocol(steps=10)
    data["measures"].update(attention_sink={"sink_keys": 0})
    bad = _train(write_protocol(tmp_path, data, "bad.yaml"), tmp_path / "bad", site=site)
    assert bad.returncode != 0 and "measures.attention_sink.sink_keys" in bad.stderr
