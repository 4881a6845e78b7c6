"""Where a run computes and with which numerics: ``train.device``, ``train.precision`` and
``train.deterministic``.

Rules:
- ``device``: ``auto`` (the first CUDA GPU torch sees, else Apple's MPS, else the CPU), ``cpu``,
  ``cuda``, ``cuda:N`` or ``mps``. A device that is named and absent is one clear error
  (:func:`resolve_device`), never a silent fall-back to the CPU.
- Everything random is drawn on the CPU and then moved: the model is initialised on the CPU from
  ``seeds.init`` and moved once; batches, eval sets and clamp constants are made on the CPU and
  moved to the run's device. So a run's initial weights and data are the same on every device,
  and two devices differ only in the arithmetic (float rounding and kernel choice). The one
  exception keeps that promise: a task on the counter stream (``task.data_stream: counter``,
  :mod:`optolab.tasks.counter`) draws training batches on the device from integer hashes that
  every device computes exactly.
- Files are device-free: checkpoints hold CPU tensors and load onto any device, so a run
  trained on a GPU resumes and evaluates on a CPU (:mod:`optolab.model.checkpoint`).
- ``precision``: ``fp32`` (the default: float32 arithmetic everywhere); ``tf32`` (float32
  matrix products may use TensorFloat-32 on NVIDIA GPUs: torch's ``high`` matmul precision);
  ``bf16`` (forward passes under ``torch.autocast`` to bfloat16; parameters, Adam's state and
  the loss stay float32). Only ``fp32`` is compared against the CPU's numbers in the tests.
- Determinism: on the CPU every run is bit-for-bit repeatable and resumes bit-identically.
  On a GPU some kernels (the backward of embedding lookups, atomics in reductions) are not;
  ``deterministic: true`` turns on ``torch.use_deterministic_algorithms`` for the run (and sets
  ``CUBLAS_WORKSPACE_CONFIG`` when unset, which cuBLAS needs for it), at some cost in speed.
- :func:`numerics` changes process-wide settings for the length of a run only and puts back
  what it found (denormal flushing, matmul precision, deterministic algorithms).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator

import torch

from optolab.core.errors import OptolabError

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


def check_device(name: str, field: str = "train.device") -> torch.device:
    """:func:`resolve_device` for a name from the command line (its spelling checked first)."""
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise OptolabError(f"'{name}' is not a device.", field=field, fix="use auto, cpu, cuda, cuda:N or mps.")
    return resolve_device(name, field)


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """The torch device ``name`` stands for on this machine (see the module rules)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise OptolabError(f"'{name}' is asked for, but torch sees no CUDA GPU on this machine.", field=field,
                               fix="use device: auto (a GPU where there is one, else the CPU) or cpu, "
                                   "or install a CUDA build of torch.")
        index = 0 if device.index is None else device.index
        if index >= n:
            raise OptolabError(f"'{name}' is asked for, but this machine has {n} GPU(s) (cuda:0..cuda:{n - 1}).",
                               field=field, fix=f"use cuda:0 .. cuda:{n - 1}, or auto.")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptolabError("'mps' is asked for, but torch sees no Apple GPU here.", field=field,
                           fix="use device: auto or cpu.")
    return device


def describe(device: torch.device) -> dict:
    """What a run records of its device in ``meta.json``."""
    info: dict = {"device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def flush_denormals(on: bool) -> bool:
    """Set whether denormal floats flush to zero and return the previous setting (to restore).

    Tiny gradients and Adam moments (e.g. a run that does not learn) turn into denormals, which
    are ~3x slower on CPU (measured): a run flushes them while it trains (``train.flush_denormals``,
    recorded in the protocol, so runs stay exact), then puts back what it found. Torch has no getter
    for the setting, so it is read by its effect: a product that is a denormal, or zero when flushed.
    """
    previous = bool((torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0)
    torch.set_flush_denormal(on)
    return previous


@contextlib.contextmanager
def numerics(device: torch.device, precision: str = "fp32", deterministic: bool = False,
             flush: bool = True) -> Iterator[None]:
    """A run's numerical settings, restored on exit (see the module rules). Forward passes run
    under :func:`autocast` separately: evaluations and training steps enter it themselves."""
    flushed = flush_denormals(flush)
    matmul = torch.get_float32_matmul_precision()
    was_det = torch.are_deterministic_algorithms_enabled()
    set_env = deterministic and device.type == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        if set_env:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(deterministic)
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        if set_env:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        torch.set_float32_matmul_precision(matmul)
        torch.set_flush_denormal(flushed)


def autocast(device: torch.device, precision: str):
    """The forward-pass context of ``precision``: bfloat16 autocast for ``bf16``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x, device: torch.device):
    """``x`` with every tensor in it (through dicts, lists, tuples and objects with a
    ``to_device(device)`` method, such as a Batch) on ``device``; anything else as it is. Tensors
    already there are returned as they are (``Tensor.to`` makes no copy)."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(to_device(v, device) for v in x)
    if hasattr(x, "to_device"):
        return x.to_device(device)
    return x


def has_compiler(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for ``device``: a C++ compiler for the CPU, Triton
    for a GPU."""
    if device.type == "cpu":
        return any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


# ``train.compile: auto`` compiles a run of at least this many training steps. Measured
# (benchmarks/compile_cost.py, one core): a cold compile
# repays itself after ~8,600 steps of the main and T4 configs (docs/speed.md#compile-auto).
AUTO_COMPILE_STEPS = 10_000


def decide_compile(train, device: torch.device, members: int = 1) -> bool:
    """Whether a run with these ``train`` settings compiles on ``device``: ``true``/``false`` as
    written; ``auto`` compiles when torch.compile can build kernels there and the job's work —
    steps × ``members`` (an ensemble's step costs about one solo step per member) — is at least
    :data:`AUTO_COMPILE_STEPS` steps, where the steps it saves repay the compile (a compile costs
    about as much as a few thousand eager steps; below that, and in tests, eager is faster)."""
    if train.compile != "auto":
        return bool(train.compile)
    return train.total_steps * members >= AUTO_COMPILE_STEPS and has_compiler(device)
