"""Bad clamps are refused before training: one line naming the clamp, the field and the fix."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from optolab.cli import main
from optolab.protocol.loader import validate_protocol
from optolab.training.trainer import train
from tests.conftest import ROOT, fewshot_protocol, repeat_protocol, write_protocol
from tests.test_bad_input import run_cli

PREV = {"kind": "set", "site": "pattern0", "heads": [1], "to": "previous_token"}

CASES = {
    "unknown site": ([{**PREV, "site": "blocks.0.attn.hook_patern"}], "clamps.0.site",
                     "did you mean 'blocks.0.attn.hook_pattern'"),
    "unknown shorthand layer": ([{**PREV, "site": "pattern7"}], "clamps.0.site", "blocks.0.attn.hook_pattern"),
    "head out of range": ([{**PREV, "heads": [4]}], "clamps.0.heads", "0..3"),
    "heads on a site without heads": ([{"kind": "ablate", "site": "resid_post0", "heads": [0]}],
                                      "clamps.0.heads", "per-head site"),
    "position out of range": ([{**PREV, "positions": [9]}], "clamps.0.positions", "inside the sequence"),
    "window past the end": ([{**PREV, "window": {"start": 0, "stop": 40, "unit": "steps"}}],
                            "clamps.0.window.stop", "<= 30"),
    "window starting after the end": ([{**PREV, "window": {"start": 10000}}], "clamps.0.window.start", "below 480"),
    "window backwards": ([{**PREV, "window": {"start": 10, "stop": 5}}], "clamps.0.window", "greater than"),
    "unknown clamp kind": ([{"kind": "optogenetics", "site": "v0"}], "clamps.0", "'kind' to one of"),
    "unknown clamp key": ([{**PREV, "head": [1]}], "clamps.0.head", "did you mean 'heads'"),
    "strength out of range": ([{**PREV, "strength": 1.5}], "clamps.0.strength", "<= 1"),
    "previous_token on a non-pattern site": ([{**PREV, "site": "v0"}], "clamps.0.site", "hook_pattern"),
    "constant without value": ([{"kind": "set", "site": "v0", "to": "constant"}], "clamps.0", "needs 'value'"),
    "conflicting clamps": ([PREV, {"kind": "set", "site": "pattern0", "heads": [1, 2], "to": "uniform"}],
                           "clamps.1.site", "disjoint heads"),
    "two outputs": ([{"kind": "perfect_copy", "layer": 1, "head": 0}, {"kind": "layer_clamp", "copy_head": 1}],
                    "clamps.1.kind", "keep only one"),
    "copy head out of range": ([{"kind": "perfect_copy", "layer": 1, "head": 8}], "clamps.0.head", "0..3"),
    "copy layer out of range": ([{"kind": "perfect_copy", "layer": 2, "head": 0}], "clamps.0.layer", "0..1"),
    "layer clamp on the last layer": ([{"kind": "layer_clamp", "layer": 1}], "clamps.0.layer", "below 1"),
    "unknown parameter": ([{"kind": "freeze", "param": "blocks.0.attn.WV"}], "clamps.0.param",
                          "did you mean 'blocks.0.attn.W_V'"),
    "graft source missing": ([{"kind": "graft", "site": "resid_post0", "source": "no/such/run"}],
                             "clamps.0.source", "does not exist"),
    "freeze source missing": ([{"kind": "freeze", "param": "W_U", "source": "nowhere.safetensors"}],
                              "clamps.0.source", "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_clamp_one_line_exit_2(tmp_path, capsys, case):
    clamps, field, fix = CASES[case]
    data = fewshot_protocol()
    data["clamps"] = clamps
    path = write_protocol(tmp_path, data)
    code, err = run_cli(capsys, "validate", path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert field in lines[0] and fix in lines[0], lines[0]
    assert f"{path}:" in lines[0]  # the line of the clamp in the file


def test_perfect_match_on_a_task_without_labels(tmp_path, capsys):
    data = repeat_protocol()
    data["clamps"] = [{"kind": "set", "site": "pattern1", "to": "perfect_match"}]
    code, err = run_cli(capsys, "run", write_protocol(tmp_path, data), "--out", tmp_path / "out")
    assert code == 2 and "clamps.0.to" in err and "no labels" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_graft_from_a_model_that_does_not_fit(tmp_path, capsys):
    other = repeat_protocol(steps=2)
    train(validate_protocol(other), tmp_path / "tokens_run", progress=False)
    data = fewshot_protocol()
    data["clamps"] = [{"kind": "graft", "site": "resid_post0", "source": str(tmp_path / "tokens_run")}]
    code, err = run_cli(capsys, "validate", write_protocol(tmp_path, data))
    assert code == 2 and "clamps.0.source" in err and "different inputs" in err

    wider = fewshot_protocol(steps=2)
    wider["model"]["d_model"] = 32
    train(validate_protocol(wider), tmp_path / "wide_run", progress=False)
    data["clamps"][0]["source"] = str(tmp_path / "wide_run")
    code, err = run_cli(capsys, "validate", write_protocol(tmp_path, data))
    assert code == 2 and "clamps.0.site" in err and "same shape" in err

    data["clamps"][0]["source"] = str(tmp_path / "wide_run" / "checkpoints" / "step_00000002.safetensors")
    data["clamps"][0]["step"] = 2
    code, err = run_cli(capsys, "validate", write_protocol(tmp_path, data))
    assert code == 2 and "clamps.0.step" in err


def test_set_file_must_fit_the_site(tmp_path, capsys):
    save_file({"p": __import__("torch").ones(3, 3)}, str(tmp_path / "bad.safetensors"))
    data = fewshot_protocol()
    data["clamps"] = [{"kind": "set", "site": "pattern0", "to": "file", "file": "bad.safetensors"}]
    code, err = run_cli(capsys, "validate", write_protocol(tmp_path, data))
    assert code == 2 and "clamps.0.file" in err and "does not broadcast" in err


def test_clamp_errors_do_not_touch_an_existing_run(tmp_path, capsys):
    good = fewshot_protocol(steps=2)
    path = write_protocol(tmp_path, good)
    assert run_cli(capsys, "run", path, "--out", tmp_path / "run", "--no-progress")[0] == 0
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    bad = dict(good, clamps=[{**PREV, "heads": [99]}])
    code, err = run_cli(capsys, "run", write_protocol(tmp_path, bad), "--out", tmp_path / "run", "--overwrite")
    assert code == 2 and "clamps.0.heads" in err
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_validate_explains_each_clamp_in_plain_words(tmp_path, capsys):
    data = fewshot_protocol()
    data["clamps"] = [{**PREV, "name": "pt", "window": {"start": 0, "stop": 18, "unit": "steps"}},
                      {"kind": "ablate", "site": "v1", "heads": [0, 2]},
                      {"kind": "layer_clamp", "apply_at": "train"}]
    data["clamps"][1]["window"] = {"start": 5, "unit": "steps"}
    assert main(["validate", str(write_protocol(tmp_path, data))]) == 0
    out = capsys.readouterr().out
    assert ("Clamp 0 (pt), from step 0 to 18 (0–288 sequences), in training and evaluation: head 1 of layer 0 "
            "attends only to the previous token") in out
    assert "Clamp 1, from step 5 to 30" in out and "(heads 0, 2) is set to zero" in out
    assert "in training only: perfect previous-token input" in out


def test_evaluate_applies_conditions_to_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "run", write_protocol(tmp_path, fewshot_protocol(steps=10)), "--out", run,
                   "--no-progress")[0] == 0
    post = fewshot_protocol(steps=10)
    post["conditions"] = {"no_layer1": [{"kind": "ablate", "site": "result1"}],
                          "pattern_preserving_L0H1": [{"kind": "preserve", "site": "pattern1"},
                                                      {"kind": "ablate", "site": "v0", "heads": [1]}]}
    path = write_protocol(tmp_path, post, "post.yaml")
    code, err = run_cli(capsys, "evaluate", path, "--checkpoint", run)
    assert code == 0, err
    import pandas as pd

    df = pd.read_csv(run / "posthoc" / "tiny_fewshot.csv")
    assert list(df.condition.unique()) == ["base", "no_layer1", "pattern_preserving_L0H1"]
    acc = df[(df.metric == "loss") & (df.split == "fsl_train")].set_index("condition").value
    trained = pd.read_parquet(run / "metrics.parquet")
    final = trained[(trained.metric == "loss") & (trained.split == "fsl_train")].sort_values("step").value.iloc[-1]
    assert abs(acc["base"] - final) < 1e-6  # no clamps: the run's own final eval
    assert acc["no_layer1"] != acc["base"]

    post["conditions"]["broken"] = [{"kind": "ablate", "site": "v9"}]
    code, err = run_cli(capsys, "evaluate", write_protocol(tmp_path, post, "post.yaml"), "--checkpoint", run)
    assert code == 2 and "conditions.broken.0.site" in err


def test_freeze_description_keeps_thousands_in_the_window():
    from optolab.protocol.describe import describe_protocol
    from optolab.protocol.loader import load_protocol

    p = load_protocol(ROOT / "protocols" / "bietti2023" / "triggers_frozen.yaml")
    text = "\n".join(describe_protocol(p))
    assert "Clamp 0, from step 0 to 10,000 (0–320,000 sequences, the whole run): parameter blocks.0.attn.W_Q" in text
