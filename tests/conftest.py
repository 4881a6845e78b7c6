"""Shared fixtures: one torch thread, tiny models and tiny protocols."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from optolab.model.config import ModelConfig
from optolab.model.transformer import build_model

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(n_layers=2, n_heads=4, d_model=16, d_head=4, n_ctx=9, d_out=7, input_mode="tokens", d_vocab=7)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model():
    return build_model(tiny_config(), seed=0)


def repeat_protocol(**train) -> dict:
    """A small repeat-token protocol as a dict (write it with ``write_protocol``)."""
    return {
        "name": "tiny_repeat",
        "task": {"kind": "repeat_tokens", "n_tokens": 16, "seq_len": 6, "n_repeats": 3},
        "model": {"n_layers": 2, "n_heads": 4, "d_model": 32, "positional": "learned"},
        "train": {"lr": 3e-3, "batch_size": 32, "steps": 40,
                  "checkpoints": {"schedule": {"unit": "steps", "every": 10}}, **train},
        "measures": {"schedule": {"unit": "steps", "every": 10}, "eval_sequences": 64},
    }


def fewshot_protocol(**train) -> dict:
    return {
        "name": "tiny_fewshot",
        "task": {"kind": "fewshot", "dim": 32, "n_train_classes": 10, "n_test_classes": 10},
        "model": {"n_layers": 2, "n_heads": 4, "d_model": 16},
        "train": {"lr": 1e-3, "batch_size": 16, "steps": 30,
                  "checkpoints": {"schedule": {"unit": "steps", "every": 10}}, **train},
        "measures": {"schedule": {"unit": "steps", "every": 10}, "eval_sequences": 50},
    }


def write_protocol(folder: Path, data: dict, name: str = "p.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def max_metrics_diff(a: Path, b: Path) -> float:
    """The largest difference between two runs' metric values, after checking that their rows
    (step, split, metric, head, ...) are the same ones in the same order."""
    x, y = pd.read_parquet(a / "metrics.parquet"), pd.read_parquet(b / "metrics.parquet")
    pd.testing.assert_frame_equal(x.drop(columns="value"), y.drop(columns="value"))
    return float(np.nanmax(np.abs(x.value.to_numpy() - y.value.to_numpy())))
