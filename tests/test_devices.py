"""Devices and numerics (optolab.core.device): what can be proven on a CPU-only machine.

The GPU itself is checked by ``benchmarks/gpu_check.py`` (docs/speed.md has its numbers); here:
``auto`` resolves to the CPU, a named device that is absent is one clear error, every run records
its device per segment, checkpoints are device-free and load onto whatever device the model is
on, a run resumes under another ``train.device``, precision settings train and are restored, and
``compile: auto`` picks as documented."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import optolab.core.device as core_device
from optolab.core.device import check_device, numerics, resolve_device, to_device
from optolab.core.errors import OptolabError
from optolab.experiments.executors import gpu_jobs, ray_gpus
from optolab.model.checkpoint import load_checkpoint, save_checkpoint
from optolab.model.transformer import build_model
from optolab.protocol.loader import validate_protocol
from optolab.tasks import make_task
from optolab.training.trainer import make_optimizer, train

torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _protocol(**train) -> dict:
    return {"name": "dev", "task": {"kind": "fewshot", "dim": 32, "n_train_classes": 10, "n_test_classes": 10},
            "model": {"n_layers": 2, "n_heads": 4, "d_model": 16},
            "train": {"lr": 1e-3, "batch_size": 8, "steps": 40,
                      "checkpoints": {"schedule": {"unit": "steps", "every": 20}}, **train},
            "measures": {"schedule": {"unit": "steps", "every": 20}, "eval_sequences": 50},
            "clamps": [{"kind": "set", "site": "pattern0", "heads": [1], "to": "previous_token"},
                       {"kind": "noise", "site": "v1", "sigma": 0.1}]}


def test_auto_is_the_cpu_without_a_gpu_and_absent_devices_are_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(OptolabError) as e:
        resolve_device("cuda:1")
    assert e.value.field == "train.device" and "no CUDA GPU" in str(e.value) and "auto" in e.value.fix
    with pytest.raises(OptolabError) as e:
        check_device("gpu", "--device")
    assert e.value.field == "--device" and "not a device" in str(e.value)


def test_a_run_records_its_device_per_segment_and_resumes_under_another_device_setting(tmp_path):
    out = tmp_path / "run"
    train(validate_protocol(_protocol(device="auto")), out, progress=False, stop_after=20)
    result = train(validate_protocol(_protocol(device="cpu")), out, progress=False)  # same run: device is not identity
    segments = json.loads((out / "meta.json").read_text())["segments"]
    assert [s["resumed_from_step"] for s in segments] == [0, 20]
    assert [s["device"] for s in segments] == [str(resolve_device("auto")), "cpu"]
    assert all(s["precision"] == "fp32" and s["compiled"] is False for s in segments)
    # and it equals the run trained in one go (bit for bit when both segments ran on the CPU)
    whole = train(validate_protocol(_protocol(device="cpu")), tmp_path / "whole", progress=False)
    split = result.task.main_split
    got, want = result.summary["final"][split]["loss"], whole.summary["final"][split]["loss"]
    assert got == want if resolve_device("auto").type == "cpu" else abs(got - want) < 1e-4


def test_a_run_started_eager_resumes_under_compile_auto(tmp_path):
    # runs recorded before compile: auto was the default say compile: false
    train(validate_protocol(_protocol(device="cpu", compile=False)), tmp_path / "run", progress=False, stop_after=20)
    result = train(validate_protocol(_protocol(device="cpu")), tmp_path / "run", progress=False)
    assert result.summary and json.loads((tmp_path / "run" / "meta.json").read_text())["status"] == "finished"


def test_a_different_protocol_is_still_refused_when_only_the_device_matches(tmp_path):
    train(validate_protocol(_protocol(device="cpu")), tmp_path / "run", progress=False, stop_after=20)
    with pytest.raises(OptolabError, match="different protocol"):
        train(validate_protocol(_protocol(device="cpu", lr=2e-3)), tmp_path / "run", progress=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_checkpoints_are_device_free_and_load_onto_the_models_device(tmp_path, device, fused):
    p = validate_protocol(_protocol(fused=fused))
    model = build_model(p.model_config_for(make_task(p.task)), 0).to(device)
    opt = make_optimizer(p, model)
    model(*[t.to(device) for t in _batch(p).inputs])[0].sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, 8, model, opt)
    for name in ("step_00000001.safetensors", "step_00000001.optim.safetensors"):
        with safe_open(str(tmp_path / name), "pt") as f:
            assert all(f.get_tensor(k).device.type == "cpu" for k in f.keys())
    for target in DEVICES:  # written on `device`, loaded onto every device this machine has
        other = build_model(model.cfg, 1).to(target)
        other_opt = make_optimizer(p, other)
        load_checkpoint(tmp_path, 1, other, other_opt)
        for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert b.device.type == target and torch.equal(a.cpu(), b.cpu()), n
        for q in other.parameters():
            state = other_opt.state[q]
            assert state["exp_avg"].device == q.device
            # torch's Adam keeps the step count on the parameter's device only when fused
            assert state["step"].device.type == (q.device.type if fused else "cpu")


def _batch(p):
    return make_task(p.task).train_batch(0, 0, 4)


def test_batches_and_nested_containers_move_whole():
    b = _batch(validate_protocol(_protocol()))
    moved = to_device({"b": b, "t": (torch.ones(2), [torch.zeros(1)]), "n": 3}, torch.device("cpu"))
    assert moved["b"] is b  # already there: no copy
    assert moved["n"] == 3 and isinstance(moved["t"], tuple) and isinstance(moved["t"][1], list)


def test_precisions_train_and_numerics_are_restored(tmp_path):
    before = (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled())
    finals = {}
    for precision in ("fp32", "tf32", "bf16"):
        r = train(validate_protocol(_protocol(precision=precision, deterministic=True)), tmp_path / precision,
                  progress=False)
        finals[precision] = r.summary["final"][r.task.main_split]["loss"]
        assert (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()) == before
    assert all(v == v for v in finals.values())  # finite
    assert finals["bf16"] != finals["fp32"]  # bf16 really ran (its rounding shows)
    assert abs(finals["bf16"] - finals["fp32"]) < 0.05
    with numerics(torch.device("cpu"), "tf32", True):
        assert torch.get_float32_matmul_precision() == "high" and torch.are_deterministic_algorithms_enabled()
    assert (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()) == before


def test_compile_auto_picks_as_documented(monkeypatch):
    cpu = torch.device("cpu")
    short = validate_protocol(_protocol()).train
    long = validate_protocol(_protocol(steps=core_device.AUTO_COMPILE_STEPS)).train
    assert short.compile == "auto" and not core_device.decide_compile(short, cpu)
    assert core_device.decide_compile(long, cpu) == core_device.has_compiler(cpu)
    assert core_device.decide_compile(validate_protocol(_protocol(compile=True)).train, cpu)
    assert not core_device.decide_compile(validate_protocol(_protocol(steps=10**6, compile=False)).train, cpu)
    monkeypatch.setattr("optolab.core.device.shutil.which", lambda name: None)
    assert not core_device.decide_compile(long, cpu)  # auto without a compiler: eager, not an error


def test_validate_says_what_compile_auto_will_do_and_why(monkeypatch):
    from optolab.protocol.describe import describe_protocol

    def described(**train) -> str:
        return " ".join(" ".join(describe_protocol(validate_protocol(_protocol(device="cpu", **train)))).split())

    short = described()  # 40 steps: auto runs eagerly, clamps on the protocol's engine
    assert "; eager (train.compile: auto: 40 steps are fewer than the 10,000" in short
    assert "applied through nnsight;" in short and "compiled path" not in short and "torch.compile (" not in short
    assert "applied through the compiled path" in described(compile=True)
    monkeypatch.setattr("optolab.core.device.shutil.which", lambda name: "/usr/bin/g++")
    long = described(steps=core_device.AUTO_COMPILE_STEPS)
    assert "every forward through torch.compile (train.compile: auto: 10,000 steps, at least" in long
    assert "applied through the compiled path" in long
    monkeypatch.setattr("optolab.core.device.shutil.which", lambda name: None)
    assert "eager (train.compile: auto: torch.compile cannot build kernels for cpu" in described(
        steps=core_device.AUTO_COMPILE_STEPS)


def test_sweeps_know_gpu_jobs():
    job = [("r", {"train": {"device": "auto"}})]
    assert not gpu_jobs([job], 0) and gpu_jobs([job], 1)
    assert gpu_jobs([[("r", {"train": {"device": "cuda:1"}})]], 0)
    assert not gpu_jobs([[("r", {"train": {"device": "cpu"}})]], 8)
    assert ray_gpus([job], 0) == 0.0 and ray_gpus([job], 2, runs_per_gpu=4) == 0.25


def test_the_default_checkpoints_are_log_spaced_early_and_a_run_resumes_under_another_schedule(tmp_path):
    from optolab.core.schedule import Schedule

    steps = Schedule(every=100_000, per_decade=4).steps(1, 300_000, "s")
    assert steps == [0, 1000, 1800, 3200, 5600, 10000, 18000, 32000, 56000, 100000, 180000, 200000, 300000]
    data = _protocol(device="cpu")
    train(validate_protocol(data), tmp_path / "run", progress=False, stop_after=20)
    data["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 5}}
    result = train(validate_protocol(data), tmp_path / "run", progress=False)  # same run: checkpoints say when, not what
    assert result.summary and 25 in optolab_checkpoints(tmp_path / "run")


def optolab_checkpoints(run_dir):
    from optolab.model.checkpoint import list_checkpoints

    return list_checkpoints(run_dir / "checkpoints")
