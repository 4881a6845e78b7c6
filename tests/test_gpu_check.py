"""``benchmarks/gpu_check.py`` without a GPU: it imports, its ensembles stage runs on the CPU (a
smoke test of the code a GPU would run), and its analytic FLOP count equals what torch's FLOP
counter sees in the model's own matrix products."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from optolab.model.config import ModelConfig
from optolab.model.kernels import PLAIN_KERNELS
from optolab.model.transformer import build_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = [
    # exemplar inputs, attention only (the Singh configs' shape); n_ctx above the short-context
    # kernels' 8 keys, so with PLAIN_KERNELS every product is a matmul the counter sees
    dict(input_mode="exemplar_label", n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=11, d_out=5,
         d_input=12, n_labels=5),
    # tokens with an MLP
    dict(input_mode="tokens", n_layers=3, n_heads=2, d_model=16, d_head=8, n_ctx=13, d_out=20, d_vocab=20,
         attn_only=False, d_mlp=24),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=["exemplar_label", "tokens+mlp"])
def test_model_flops_equal_torchs_count_of_a_training_step(gpu_check, fields):
    cfg = ModelConfig(**fields)
    model = build_model(cfg, 0)
    b = 3
    if cfg.input_mode == "tokens":
        inputs = (torch.randint(cfg.d_vocab, (b, cfg.n_ctx)),)
    else:
        n_lab = cfg.n_ctx // 2
        inputs = (torch.randn(b, n_lab + 1, cfg.d_input), torch.randint(cfg.n_labels, (b, n_lab)))
    token = PLAIN_KERNELS.set(True)
    try:
        with FlopCounterMode(display=False) as counter:
            logits = model(*inputs)
            forward = counter.get_total_flops()
            F.cross_entropy(logits.flatten(0, 1), torch.zeros(b * cfg.n_ctx, dtype=torch.long)).backward()
    finally:
        PLAIN_KERNELS.reset(token)
    want = gpu_check.model_flops(cfg, b)
    assert want["forward"] == forward
    assert want["train"] == counter.get_total_flops()


def test_peak_rates_come_from_the_gpus_name_or_the_override(gpu_check):
    assert gpu_check.peak_tflops("NVIDIA H200") == (67.0, 494.7)
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == (51.0, 378.0)
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == (67.0, 494.7)
    assert gpu_check.peak_tflops("Some GPU") is None
    assert gpu_check.peak_tflops("NVIDIA H200", [10.0, 80.0]) == (10.0, 80.0)


def test_the_ensembles_stage_runs_on_the_cpu(gpu_check):
    res = gpu_check.stage_ensemble_rates(time.perf_counter() + 120, [1, 3], 2, "cpu", modes=["eager"],
                                         peak_override=[1.0, 8.0])
    rates = res["rates"]["eager_fp32"]
    assert set(rates) == {1, 3}
    for r in rates.values():
        assert r["model_steps_per_s"] > 0 and 0 < r["fraction_of_fp32_peak"] == pytest.approx(
            8 * r["fraction_of_tf32_peak"], rel=1e-3)
    assert res["model_flops_per_step"] > 0 and res["torch_stream_cpu_ms_per_member_step"] > 0
