"""The GPU check (issue 20): one short command that trains on ``cuda`` what the CPU numbers
describe, compares them, and measures ensemble throughput. Sized for a GPU lent for ~15 minutes:
every stage has a deadline and the whole check stops at ``--budget`` seconds, writing what it has.

Stages, in order (``--stages`` picks some):
- ``main``: ``protocols/singh2024/main.yaml`` (31,250 steps; ``compile: auto`` compiles it) on
  ``cuda`` and, at the same time in another process, on the CPU; both runs' time to loss 0.5
  and 0.277 and the largest difference of the main split's loss over all evals.
- ``t4``: the T4 sweep (``protocols/sweeps/t4_fig5b.yaml``, 18 runs packed into seed ensembles)
  with ``--device cuda`` and, at the same time, with ``--device cpu``: wall times, and every
  run's time to loss 0.5 on both.
- ``ensembles``: model-steps/s of the ensemble training step (vmapped forward, loss, gradient,
  fused Adam) for S = 1 ... 4096 members, every step's batches drawn on the GPU from the counter
  stream (``task.data_stream: counter``) inside the timed loop; eager, captured (compiled and
  replayed as a CUDA graph) and compiled; with the fraction of the chip's float32 and TF32 peak
  that the model's FLOPs (:func:`model_flops`) reach (peaks: :data:`PEAK_TFLOPS` by GPU name, or
  ``--peak-tflops FP32 TF32``). Also the CPU cost of the torch stream's batch per member-step.
- ``resume``: a run trained 120 steps on ``cuda``, then resumed and finished on the CPU, against
  the same run on the CPU alone (checkpoints are device-free).
- ``determinism``: a short clamped run twice, with and without ``train.deterministic``.
- ``pytest``: the test suite with ``train.device: auto`` resolving to the GPU (xdist workers).

Writes ``OUT/gpu_check.json`` (and logs) and prints a summary. Needs a CUDA GPU.

    python benchmarks/gpu_check.py --out /tmp/gpu [--budget 420] [--stages main t4 ensembles resume pytest]
    python benchmarks/gpu_check.py --stages ensembles --budget 300 --ensemble-share 1 --ensemble-precisions fp32 tf32
    make gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _optolab(*args: str) -> list[str]:
    return [PY, "-m", "optolab", *args]


def _summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: (s.get(k) or {}).get("sequences") for k in ("time_to_loss_0.5", "time_to_loss_0.277")}


def _main_loss(run_dir: Path):
    import pandas as pd

    df = pd.read_parquet(run_dir / "metrics.parquet")
    main = json.loads((run_dir / "summary.json").read_text())["main_split"]
    return df[(df.split == main) & (df.metric == "loss")].set_index("step")["value"]


def _last_step(run_dir: Path) -> int | None:
    """The last evaluated step of a run (finished or not)."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    lines = f.read_text().strip().splitlines()
    return json.loads(lines[-1])["step"] if lines else None


def _spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def _wait(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, float | None]:
    """Each process's wall time (None: killed at the deadline or failed)."""
    start = time.perf_counter()
    walls: dict[str, float | None] = {}
    for name, p in procs.items():
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.perf_counter()))
            walls[name] = time.perf_counter() - start if rc == 0 else None
        except subprocess.TimeoutExpired:
            p.kill()
            walls[name] = None
    return walls


def stage_runs(out: Path, deadline: float, device: str, workers: int, which: list[str]) -> dict:
    """``main`` and ``t4`` (see the module docstring), on ``device`` and the CPU, all at once."""
    protocol = str(ROOT / "protocols" / "singh2024" / "main.yaml")
    sweep = str(ROOT / "protocols" / "sweeps" / "t4_fig5b.yaml")
    procs = {}
    for dev in (device, "cpu"):
        if "main" in which:
            procs[f"main_{dev}"] = _spawn(_optolab("run", protocol, "--device", dev, "--out", str(out / f"main_{dev}"),
                                                   "--overwrite", "--no-progress"), out / f"main_{dev}.log")
        if "t4" in which:
            procs[f"t4_{dev}"] = _spawn(_optolab("sweep", sweep, "--device", dev, "--out", str(out / f"t4_{dev}"),
                                                 "--workers", str(workers)), out / f"t4_{dev}.log")
    started = time.perf_counter()
    walls = _wait(procs, deadline)
    res: dict = {"wall_s": {k: None if v is None else round(v, 1) for k, v in walls.items()},
                 "waited_s": round(time.perf_counter() - started, 1),
                 "main_last_step": {dev: _last_step(out / f"main_{dev}") for dev in (device, "cpu")}}
    if walls.get(f"main_{device}") and walls.get("main_cpu"):
        a, b = _main_loss(out / f"main_{device}"), _main_loss(out / "main_cpu")
        res["main"] = {"gpu": _summary(out / f"main_{device}"), "cpu": _summary(out / "main_cpu"),
                       "max_abs_loss_diff": float((a - b).abs().max()),
                       "segment": json.loads((out / f"main_{device}" / "meta.json").read_text())["segments"][-1]}
    if "t4" in which:
        runs: dict = {}
        for dev in (device, "cpu"):
            for d in sorted((out / f"t4_{dev}").glob("*/summary.json")):
                runs.setdefault(d.parent.name, {})[dev] = _summary(d.parent)["time_to_loss_0.5"]
        both = [r for r in runs.values() if device in r and "cpu" in r]
        res["t4"] = {"time_to_loss_0.5": runs, "compared": len(both), "workers": workers,
                     "equal": sum(r[device] == r["cpu"] for r in both),
                     "last_step": {dev: {d.name: _last_step(d) for d in sorted((out / f"t4_{dev}").glob("*_s*"))}
                                   for dev in (device, "cpu")}}
    return res


# Peak dense rates (TFLOP/s) from NVIDIA's datasheets: (float32 on the CUDA cores, TF32 on the
# tensor cores without sparsity; the datasheets' TF32 figures are with sparsity, twice these).
# The first name that is a part of torch.cuda.get_device_name wins; --peak-tflops overrides.
PEAK_TFLOPS = {
    "H200": (67.0, 494.7),
    "H100 PCIe": (51.0, 378.0),
    "H100 NVL": (60.0, 417.5),
    "H100": (67.0, 494.7),  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": (19.5, 156.0),
    "L40S": (91.6, 183.0),
}


def peak_tflops(name: str | None, override: list[float] | None = None) -> tuple[float, float] | None:
    """``(float32, tf32)`` peak TFLOP/s of the GPU called ``name``, or None when unknown."""
    if override:
        return float(override[0]), float(override[-1])
    for key, rates in PEAK_TFLOPS.items():
        if name and key in name:
            return rates
    return None


def model_flops(cfg, batch_size: int) -> dict[str, int]:
    """Matrix-product FLOPs of one training step of one model (2 per multiply-add), counted from
    the model's shape: what the model needs, not what a kernel spends (the short-context kernels
    of optolab/model/kernels.py trade extra arithmetic for fewer ops; the count ignores that).

    Per sequence of ``n = n_ctx`` positions, forward: the exemplar map ``2·n_ex·d_input·d``
    (exemplar inputs; a token embedding is a lookup), per layer Q, K, V and O ``4 · 2·n·d·h·e``,
    scores and mixing ``2 · 2·h·n²·e`` (the full square, as computed), the MLP ``2 · 2·n·d·d_mlp``,
    and the unembedding ``2·n·d·d_out``. Training is three forwards (the backward takes the
    gradients of inputs and weights, two products per product), less the exemplar map's input
    gradient (its input is data). Norms, softmax, the loss and Adam are not counted."""
    n, d, h, e = cfg.n_ctx, cfg.d_model, cfg.n_heads, cfg.d_head
    embed = 2 * ((n + 1) // 2) * cfg.d_input * d if cfg.input_mode == "exemplar_label" else 0
    layer = 4 * 2 * n * d * h * e + 2 * 2 * h * n * n * e
    if not cfg.attn_only:
        layer += 2 * 2 * n * d * cfg.d_mlp
    forward = embed + cfg.n_layers * layer + 2 * n * d * cfg.d_out
    return {"forward": batch_size * forward, "train": batch_size * (3 * forward - embed)}


def _counter_protocol():
    """T4's ``fig5b_prev_token`` (an ablation and a pattern clamp) on the counter stream."""
    from optolab.protocol.loader import load_protocol, validate_protocol

    data = load_protocol(ROOT / "protocols" / "singh2024" / "fig5b_prev_token.yaml").resolved()
    data["task"]["data_stream"] = "counter"
    return validate_protocol(data)


def _ensemble_rate(S: int, mode: str, steps: int, device: str, precision: str = "fp32") -> dict:
    """Model-steps/s of the ensemble training step for ``S`` seeds of ``fig5b_prev_token`` with
    every step's batches drawn on the device (the counter stream), timed together. ``mode``:
    ``eager``; ``compiled`` (torch.compile, one graph); ``captured`` (compiled and, on cuda,
    replayed as one CUDA graph: inductor's ``triton.cudagraphs``, what mode="reduce-overhead" sets)."""
    import copy

    import torch

    from optolab.clamps.rng import call_key
    from optolab.clamps.union import Conditions
    from optolab.core.device import numerics
    from optolab.model.transformer import build_model
    from optolab.tasks import make_task
    from optolab.training import ensemble as E
    from optolab.training.batches import Batches
    from optolab.training.compiled import step_options
    from optolab.training.trainer import make_forward, make_optimizer

    dev = torch.device(device)
    p = _counter_protocol()
    task = make_task(p.task)
    cfg = p.model_config_for(task)
    forward = make_forward(p, task, cfg, dev, compiled=False)
    conditions = Conditions([forward], [0] * S, dev)
    models = [build_model(cfg, s).to(dev) for s in range(S)]
    names = [n for n, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(True)
              for n in names}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in models[0].named_buffers()}
    del models
    optimizer = make_optimizer(p, E._Params(params))
    E.ensure_state(optimizer)
    skeleton = copy.deepcopy(build_model(cfg, 0)).to("meta")
    captured = mode == "captured" and dev.type == "cuda"
    options = {**step_options(dev), "triton.cudagraphs": True} if captured else None
    step_fn = E._Step(skeleton, conditions, names, mode != "eager", dev, options=options)
    draw = Batches(task, list(range(S)), p.train.batch_size, 10**9, device=dev)
    keys = torch.stack([call_key(s, s, 0, True) for s in range(S)]).to(dev)
    alive = torch.ones(S, dtype=torch.bool, device=dev)
    plain = E.plain_adam(p)

    def one(i: int) -> None:
        tensors, rest, n_inputs = E._stacked_fields(draw.stacked(i))
        if captured:  # the previous replay's outputs are consumed: the next may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        grads, _losses = step_fn(i, params, buffers, tensors, keys, rest, n_inputs, alive)
        skip = step_fn.unused(i, params, buffers, tensors, keys, rest, n_inputs)
        E._adam(optimizer, params, grads, skip, plain)

    with numerics(dev, precision):
        for i in range(3):  # compiles (compiled), captures (captured) and warms the allocator
            one(i)
        _sync(dev)
        t = time.perf_counter()
        for i in range(steps):
            one(3 + i)
        _sync(dev)
        rate = S * steps / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(steps):
            draw.stacked(3 + i)
        _sync(dev)
        generation = (time.perf_counter() - t) / steps
    return {"model_steps_per_s": round(rate, 1), "generation_ms_per_step": round(generation * 1e3, 3)}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def stage_ensemble_rates(deadline: float, sizes: list[int], steps: int, device: str,
                         modes: list[str] = ("eager", "captured", "compiled"), precisions: list[str] = ("fp32",),
                         peak_override: list[float] | None = None) -> dict:
    """Model-steps/s for every mode, precision and size (smallest first, until the deadline),
    with the fraction of the chip's float32 and TF32 peak the model's FLOPs reach at that rate."""
    import torch

    from optolab.tasks import make_task

    p = _counter_protocol()
    task = make_task(p.task)
    flops = model_flops(p.model_config_for(task), p.train.batch_size)["train"]
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    peak = peak_tflops(name, peak_override)
    res: dict = {"data_stream": "counter (drawn on the device, inside the timed step)", "gpu": name,
                 "model_flops_per_step": flops, "peak_tflops_fp32_tf32": peak, "rates": {}}
    for precision in precisions:
        for mode in modes:
            got = res["rates"].setdefault(f"{mode}_{precision}", {})
            for S in sizes:
                if time.perf_counter() > deadline - (5 if mode == "eager" else 40):
                    got[S] = "skipped: out of time"
                    break
                try:
                    r = _ensemble_rate(S, mode, steps, device, precision)
                except Exception as e:  # noqa: BLE001 - a size that does not fit is reported, not fatal
                    got[S] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                    continue
                if peak is not None:
                    tflops = r["model_steps_per_s"] * flops / 1e12
                    r["fraction_of_fp32_peak"] = float(f"{tflops / peak[0]:.4g}")
                    r["fraction_of_tf32_peak"] = float(f"{tflops / peak[1]:.4g}")
                got[S] = r
                print(f"ensembles {mode} {precision} S={S}: {r}", flush=True)
    legacy = make_task(p.task.model_copy(update={"data_stream": "torch"}))
    t = time.perf_counter()
    for i in range(200):
        legacy.train_batch(0, i, p.train.batch_size)
    res["torch_stream_cpu_ms_per_member_step"] = round((time.perf_counter() - t) / 200 * 1e3, 3)
    res["torch_threads"] = torch.get_num_threads()
    return res


def stage_resume(out: Path, device: str) -> dict:
    from optolab.protocol.loader import load_protocol, validate_protocol
    from optolab.training.trainer import train

    base = load_protocol(ROOT / "protocols" / "quickstart.yaml").resolved()
    base["train"].pop("sequences", None)
    base["train"].update(steps=200, compile=False)
    base["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 40}}
    base["measures"] = {**base["measures"], "schedule": {"unit": "steps", "every": 40}, "eval_sequences": 200}
    on = {d: validate_protocol({**base, "train": {**base["train"], "device": d}}) for d in (device, "cpu")}
    train(on[device], out / "moved", progress=False, stop_after=120)
    train(on["cpu"], out / "moved", progress=False)  # resumes the GPU run on the CPU
    train(on["cpu"], out / "cpu_only", progress=False)
    a, b = _main_loss(out / "moved"), _main_loss(out / "cpu_only")
    segments = json.loads((out / "moved" / "meta.json").read_text())["segments"]
    return {"max_abs_loss_diff": float((a - b).abs().max()), "segments": [s.get("device") for s in segments],
            "finished": json.loads((out / "moved" / "meta.json").read_text())["status"]}


def _all_values(run_dir: Path):
    import pandas as pd

    df = pd.read_parquet(run_dir / "metrics.parquet")
    return df.sort_values(list(df.columns.drop("value"))).reset_index(drop=True)["value"]


def stage_determinism(out: Path, device: str) -> dict:
    """The same short run twice on ``device``, with and without ``train.deterministic``: the
    largest difference of any metric between the two (0.0: bit-identical)."""
    from optolab.protocol.loader import load_protocol, validate_protocol
    from optolab.training.trainer import train

    base = load_protocol(ROOT / "protocols" / "singh2024" / "fig5b_prev_token.yaml").resolved()
    base["train"].pop("sequences", None)
    base["train"].update(steps=150, compile=False, device=device)
    base["train"]["checkpoints"] = {"schedule": {"unit": "steps", "every": 150}}
    base["measures"] = {**base["measures"], "schedule": {"unit": "steps", "every": 50}, "eval_sequences": 200}
    res = {}
    for det in (False, True):
        p = validate_protocol({**base, "train": {**base["train"], "deterministic": det}})
        dirs = [out / f"det_{det}_{i}" for i in range(2)]
        for d in dirs:
            train(p, d, progress=False)
        res[f"deterministic_{str(det).lower()}_max_diff"] = float((_all_values(dirs[0]) - _all_values(dirs[1])).abs().max())
    return res


def stage_pytest(out: Path, deadline: float, workers: int, files: list[str]) -> dict:
    cmd = [PY, "-m", "pytest", "-v", "-p", "optolab.testing.pytest_plugin", "-n", str(workers),
           "-p", "no:cacheprovider", "--tb=short", *(files or ["tests"])]
    log = out / "pytest.log"
    p = _spawn(cmd, log)
    try:
        rc = p.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        p.kill()
        rc = None
    lines = log.read_text().splitlines() if log.is_file() else []
    return {"rc": rc, "passed": sum(" PASSED " in x for x in lines), "skipped": sum(" SKIPPED " in x for x in lines),
            "failed": [x.split(" FAILED ")[-1] for x in lines if " FAILED " in x][:40],
            "last_line": lines[-1] if lines else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    ap.add_argument("--stages", nargs="+", default=["main", "t4", "ensembles", "resume", "determinism", "pytest"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096])
    ap.add_argument("--ensemble-modes", nargs="+", default=["eager", "captured", "compiled"],
                    choices=["eager", "captured", "compiled"])
    ap.add_argument("--ensemble-precisions", nargs="+", default=["fp32"], choices=["fp32", "tf32"])
    ap.add_argument("--ensemble-share", type=float, default=0.2, help="share of the budget for ensembles")
    ap.add_argument("--peak-tflops", type=float, nargs="+", default=None, metavar="TFLOPS",
                    help="the GPU's float32 and TF32 peak (TFLOP/s) when its name is not in the table")
    ap.add_argument("--workers", type=int, default=6, help="sweep workers per device (T4) and pytest workers")
    ap.add_argument("--runs-share", type=float, default=0.55, help="share of the budget for main and t4")
    ap.add_argument("--together", action="store_true", help="run the pytest stage alongside the others")
    ap.add_argument("--pytest-files", nargs="*", default=[], help="test files for the pytest stage (default: all)")
    ap.add_argument("--device", default="cuda", help="the device under test (cpu: a smoke test of the script)")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU here; run it on a GPU machine.")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    end = t0 + args.budget
    report: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(), "stages": {},
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    stages = list(args.stages)
    if "main" in stages or "t4" in stages:  # trained at the same time (and with pytest, when asked)
        stages = ["runs"] + [s for s in stages if s not in ("main", "t4")]
    background = None
    if args.together and "pytest" in stages:
        stages.remove("pytest")
        background = _spawn([PY, "-m", "pytest", "-v", "-p", "optolab.testing.pytest_plugin", "-n", str(args.workers),
                             "-p", "no:cacheprovider", "--tb=short", *(args.pytest_files or ["tests"])],
                            out / "pytest.log")
    for stage in stages:
        left = end - time.perf_counter()
        if left < 20:
            report["stages"][stage] = "skipped: out of time"
            continue
        ts = time.perf_counter()
        try:
            if stage == "runs":
                got = stage_runs(out, min(end, ts + args.runs_share * args.budget), args.device, args.workers, args.stages)
            elif stage == "ensembles":
                got = stage_ensemble_rates(min(end, ts + args.ensemble_share * args.budget), args.sizes, 50,
                                           args.device, args.ensemble_modes, args.ensemble_precisions, args.peak_tflops)
            elif stage == "resume":
                got = stage_resume(out, args.device)
            elif stage == "determinism":
                got = stage_determinism(out, args.device)
            elif stage == "pytest":
                got = stage_pytest(out, end, args.workers, args.pytest_files)
            else:
                got = "unknown stage"
        except Exception as e:  # noqa: BLE001 - one broken stage must not lose the others' numbers
            import traceback

            got = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        if isinstance(got, dict):
            got["stage_s"] = round(time.perf_counter() - ts, 1)
        report["stages"][stage] = got
        save()
        print(stage, json.dumps(got, default=str)[:1500], flush=True)
    if background is not None:
        try:
            background.wait(timeout=max(1.0, end - time.perf_counter()))
        except subprocess.TimeoutExpired:
            background.kill()
        lines = (out / "pytest.log").read_text().splitlines()
        report["stages"]["pytest"] = {"rc": background.returncode, "passed": sum(" PASSED " in x for x in lines),
                                      "failed": [x.split(" FAILED ")[-1] for x in lines if " FAILED " in x][:40],
                                      "last_line": lines[-1] if lines else None}
        print("pytest", json.dumps(report["stages"]["pytest"])[:1500], flush=True)
    save()
    print(f"written to {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
