"""Windows as inputs of the compiled program: a site clamp's window gates its ops through
``ctx.live`` (made outside the graph), so crossing a window's boundary, or packing conditions that
differ only in their windows (a window scan), compiles no new graph; the numbers, the phases a
window acts in and resumption are those of the switching path."""

from __future__ import annotations

import copy

import pytest
import torch

from optolab.clamps.engine import ClampForward
from optolab.model.transformer import build_model
from optolab.protocol.loader import validate_protocol
from optolab.tasks import make_task
from optolab.training.compiled import CompiledForward
from optolab.training.ensemble import train_ensemble
from optolab.training.trainer import train

from .conftest import fewshot_protocol, max_metrics_diff

TOLERANCE = 1e-5  # as tests/test_compiled.py: the compiler reorders float sums
PREV = {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token", "apply_at": "train"}
# cuts block 0 and the embeddings off the loss while it acts: no Adam update for them there
# (weight decay would show one), as on the switching path
CUT = {"kind": "set", "site": "resid_post0", "to": "constant", "value": 0.0, "apply_at": "train"}


def _window(start: int, stop: int) -> dict:
    return {"window": {"start": start, "stop": stop, "unit": "steps"}}


def _protocol(clamps: list[dict], compiled: bool = True, seed: int = 0):
    data = fewshot_protocol(steps=40, weight_decay=0.05, compile=compiled)
    data.update(name=f"w{seed}", clamps=copy.deepcopy(clamps), seeds={"init": seed, "data": seed, "eval": 1})
    return validate_protocol(data)


def _graphs(fn, *args, **kwargs) -> int:
    """Graphs torch.compile built for a run (its caches are cleared when a compiled run starts)."""
    from torch._dynamo.utils import counters

    counters.clear()
    fn(*args, **kwargs)
    return counters["stats"]["unique_graphs"]


def test_the_gated_program_acts_exactly_where_the_window_says_in_both_phases():
    # eager calls through the compiled path's site hooks: the gated program against the program
    # of the clamps acting at the step (the switching path's), bit for bit
    clamps = [{**PREV, **_window(10, 25)}, {**PREV, "heads": [1], "apply_at": "both", **_window(5, 40)},
              {**CUT, "apply_at": "eval", **_window(20, 30)}]
    p = _protocol(clamps)
    task = make_task(p.task)
    cfg = p.model_config_for(task)
    model, batch = build_model(cfg, 0), task.train_batch(0, 0, 8)
    plan = p.clamp_plan(task, cfg)
    forward = CompiledForward(ClampForward(plan))
    assert forward.inner.gated(True) == {0, 1} and forward.inner.gated(False) == {1, 2}
    dispatch, programs, outputs = forward.dispatch(model), set(), {}
    for training in (True, False):
        for step in (0, 5, 9, 10, 19, 20, 24, 25, 29, 30, 39, 40):
            program, inputs = forward.program(model, batch, step, training)
            programs.add((training, id(program)))
            own = forward.own_program(step, training)
            dispatch.cover(own)
            got = outputs[training, step] = dispatch.run(program, batch, inputs)[0]
            assert torch.equal(got, dispatch.run(own, batch, inputs)[0]), (training, step)
    assert len(programs) == 2  # one program per phase, whatever the step
    assert not torch.equal(outputs[True, 9], outputs[True, 10])  # the train-only clamp starts at 10 ...
    assert torch.equal(outputs[False, 9], outputs[False, 10])  # ... and never acts at evals
    assert not torch.equal(outputs[False, 19], outputs[False, 20])  # the eval-only one starts at 20
    forward.close()


@pytest.mark.numerics
def test_a_windowed_compiled_run_equals_the_nnsight_run_and_resumes_exactly(tmp_path):
    clamps = [{**PREV, **_window(10, 25)}, {**CUT, **_window(20, 30)},
              {"kind": "ablate", "site": "v1", "heads": [0], "apply_at": "both", **_window(15, 40)}]
    train(_protocol(clamps, compiled=False), tmp_path / "nnsight", progress=False)
    whole = train(_protocol(clamps), tmp_path / "whole", progress=False)
    assert max_metrics_diff(tmp_path / "nnsight", tmp_path / "whole") < TOLERANCE
    train(_protocol(clamps), tmp_path / "cut", progress=False, stop_after=20)  # between two boundaries
    resumed = train(_protocol(clamps), tmp_path / "cut", progress=False)
    assert max_metrics_diff(tmp_path / "whole", tmp_path / "cut") == 0.0
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_crossing_a_window_boundary_compiles_no_graph(tmp_path):
    always = _graphs(train, _protocol([PREV]), tmp_path / "always", progress=False)
    windowed = _graphs(train, _protocol([{**PREV, **_window(10, 25)}]), tmp_path / "windowed", progress=False)
    assert 0 < windowed <= always


def test_a_window_scan_packed_in_one_ensemble_compiles_as_one_condition(tmp_path):
    # two seeds of one condition without a boundary, against four conditions that differ only in
    # their windows (each crossing one or two boundaries)
    seeds = [_protocol([PREV], seed=s) for s in (0, 1)]
    one = _graphs(train_ensemble, seeds, [tmp_path / f"seed{s}" for s in (0, 1)])
    scan = [_protocol([{**PREV, **_window(10 * k, 10 * k + 10)}], seed=k) for k in range(4)]
    outs = [tmp_path / f"scan{k}" for k in range(4)]
    assert 0 < _graphs(train_ensemble, scan, outs) <= one
    for k in (0, 2):  # members equal their solo runs on the switching (eager nnsight) path
        solo = tmp_path / f"solo{k}"
        train(_protocol(scan[k].resolved()["clamps"], compiled=False, seed=k), solo, progress=False)
        assert max_metrics_diff(outs[k], solo) < TOLERANCE
