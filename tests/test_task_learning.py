"""Qualitative learning tests on the new generators (tiny models, a few hundred steps)."""

from __future__ import annotations

import math

from optolab.api import run
from optolab.protocol.loader import load_protocol

from .conftest import write_protocol


def test_markov_model_leaves_uniform_and_plots_loss_by_position(tmp_path):
    data = {
        "name": "tiny_markov",
        "task": {"kind": "markov_icl", "n_states": 3, "seq_len": 40, "reference_sequences": 300},
        "model": {"n_layers": 2, "n_heads": 1, "d_model": 16},
        "train": {"lr": 3e-3, "batch_size": 16, "steps": 150,
                  "checkpoints": {"schedule": {"unit": "steps", "every": 75}}},
        "measures": {"schedule": {"unit": "steps", "every": 50}, "eval_sequences": 128, "copying": False},
    }
    result = run(load_protocol(write_protocol(tmp_path, data)), tmp_path / "run", progress=False)
    loss = result.metrics.query("metric == 'loss' and split == 'val'").sort_values("step").value
    refs = result.task.reference_losses()
    assert loss.iloc[0] > math.log(3) and loss.iloc[-1] < math.log(3) - 0.05  # below uniform
    assert loss.iloc[-1] < refs["in-context unigram"] + 0.05  # at least the unigram plateau
    assert (result.dir.figures / "loss_by_position.png").is_file()
