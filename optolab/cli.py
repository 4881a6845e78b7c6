"""``optolab`` command line: run, validate, sites, evaluate, llc, plot, sweep, discover, export, report, tasks
show|check|list.

Every user error prints one line (``optolab: error: <where>: <what> Fix: <how>``) and exits
with code 2; no traceback. Interrupting a run leaves its last checkpoint; the same command
resumes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from optolab.core.errors import EXIT_USER_ERROR, OptolabError

MAX_SEED = 2**63 - 1  # as optolab.core.counts.MAX_SEED (not imported: --help stays light)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer (at most {MAX_SEED}), got {text!r}. "
                                         "Fix: pass e.g. --seed 3")
    return value


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line and exit 2, as every other bad input (not a usage dump)."""

    def error(self, message: str):
        message = message.removeprefix("argument ")
        flag, _, what = message.partition(": ")
        if what.startswith("expected") and "argument" in what and flag.startswith("--"):
            # argparse reads a value like -1e-4 as another flag, and then says only this
            message = (f"{flag}: {what.rstrip('.')} (a value that starts with '-', as -1e-4, is read as a "
                       f"flag). Fix: give it, joined to its flag when it starts with '-': {flag.split('/')[0]}=VALUE")
        if "Fix:" not in message:
            message = f"{message.rstrip('.')}. Fix: see `{self.prog} --help`"
        self.exit(EXIT_USER_ERROR, f"optolab: error: {self.prog}: {message}.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optolab", description="Causal-intervention lab for induction heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train a protocol (resumes an unfinished run in --out)")
    p.add_argument("protocol")
    p.add_argument("--seed", type=_seed, help="set the init and data seeds (the eval seed stays fixed)")
    p.add_argument("--out", help="run directory (default: results/<name>_s<seed>)")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for tiny models)")
    p.add_argument("--device", help="set train.device: auto, cpu, cuda, cuda:N or mps (a run may resume on another)")

    p = sub.add_parser("validate", help="check a protocol and explain it in plain words")
    p.add_argument("protocol")
    p.add_argument("--seed", type=_seed)
    p.add_argument("--resolved", action="store_true", help="also print the resolved YAML")

    p = sub.add_parser("sites", help="every hook name with its shape for the protocol's model")
    p.add_argument("protocol")

    p = sub.add_parser("evaluate", help="apply a protocol's clamps to a saved model and report the measures")
    p.add_argument("protocol")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (last checkpoint) or RUN_DIR/checkpoints/step_*.safetensors")
    p.add_argument("--out", help="CSV to write (default: RUN_DIR/posthoc/<protocol name>.csv)")

    p = sub.add_parser("llc", help="the local learning coefficient at a run's checkpoints (SGLD; needs optolab[llc])")
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, nargs="+", help="checkpoint steps (default: every --every-th and the last)")
    p.add_argument("--every", type=int, help="every N-th checkpoint (default: the run's measures.llc, else 1)")
    p.add_argument("--heads", nargs="+", help="also these heads' restricted LLCs, e.g. L1H3 L0H4")
    p.add_argument("--chains", type=int)
    p.add_argument("--draws", type=int)
    p.add_argument("--burn-in", type=int)
    p.add_argument("--step-size", type=float, help="SGLD step size ε")
    p.add_argument("--nbeta", type=float, help="inverse temperature nβ (default: the run's measures.llc, else 3000)")
    p.add_argument("--localization", type=float, help="γ: pull towards the checkpoint's weights")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--no-clamps", action="store_true", help="sample the bare model, not under the run's clamps")
    p.add_argument("--calibrate", action="store_true",
                   help="sweep --step-sizes × --nbetas on one checkpoint (--step, default the last) and plot the traces")
    p.add_argument("--step", type=int, help="the checkpoint a calibration uses")
    p.add_argument("--step-sizes", type=float, nargs="+", help="default: 1e-5 3e-5 1e-4")
    p.add_argument("--nbetas", type=float, nargs="+", help="default: 300 1000 3000 10000")

    p = sub.add_parser("plot", help="(re)write the figures of a run directory")
    p.add_argument("run_dir")

    p = sub.add_parser("sweep", help="run a sweep file (skips finished runs, resumes unfinished ones)")
    p.add_argument("sweep")
    p.add_argument("--out", required=True, help="sweep directory (one run directory per run id)")
    p.add_argument("--workers", type=int, help="processes, or CPUs of a local Ray (default: CPU count); one torch thread each")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs only")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local process pool (default) or Ray")
    p.add_argument("--address", help="Ray cluster to connect to (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--pack", choices=["auto", "seeds", "off"], default="auto",
                   help="train compatible runs as one ensemble: auto = across conditions that need the same "
                        "forward passes, seeds = only runs of one condition, off = each alone (default: auto)")
    p.add_argument("--max-pack", type=int, default=8, help="most runs in one ensemble (default 8)")
    p.add_argument("--max-runs", type=int, default=1000, help="refuse a sweep of more runs (default 1000)")
    p.add_argument("--device", help="set every run's train.device: auto, cpu, cuda, cuda:N or mps")

    p = sub.add_parser("export", help="a run's checkpoint for another library (TransformerLens; needs optolab[tl])")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, choices=["transformer-lens"])
    p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
    p.add_argument("--out", help="weights file (default: RUN_DIR_tl_step<N>.safetensors beside the run)")

    p = sub.add_parser("discover", help="screen -> confirmation -> critical windows -> dose, and a formation map")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="folder of the stages' sweep directories and formation_map.md")
    p.add_argument("--workers", type=int, help="processes (default: the file's, else the CPU count)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimated CPU-minutes only")

    p = sub.add_parser("report", help="summary.csv, conditions.csv and report.md of a sweep directory")
    p.add_argument("sweep_dir")

    p = sub.add_parser("tasks", help="inspect and check task generators")
    tasks = p.add_subparsers(dest="tasks_command", required=True)
    t = tasks.add_parser("show", help="decoded sequences and split statistics of a task (spec YAML or protocol)")
    t.add_argument("task")
    t.add_argument("--n", type=int, default=3, help="training sequences to print")
    t.add_argument("--seed", type=_seed, default=0)
    t = tasks.add_parser("check", help="check a generator's contract (optolab.testing.check_task)")
    t.add_argument("task")
    t.add_argument("--max-batch-ms", type=float, default=50.0, help="time budget of one batch of 32")
    tasks.add_parser("list", help="the task kinds this installation knows")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except OptolabError as e:
        print(f"optolab: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("optolab: interrupted; the last checkpoint is kept — run the same command to resume.",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    import torch

    from optolab.protocol.loader import load_protocol

    if args.command in ("run", "validate") and _is_toy(args.protocol):
        return _toy(args)
    if args.command == "run":
        from optolab.api import default_out, run

        torch.set_num_threads(max(1, args.threads))
        protocol = load_protocol(args.protocol, seed=args.seed, device=args.device)
        out = args.out or default_out(protocol)
        result = run(protocol, out, overwrite=args.overwrite, progress=not args.no_progress)
        s = result.summary
        t = s.get("time_to_loss_0.5")
        when = f"{t['sequences']:,} sequences (step {t['step']:,})" if t else "never"
        print(f"run written to {result.path}")
        print(f"{s['main_split']} loss below 0.5 at: {when}; final loss "
              f"{s['final'][s['main_split']]['loss']:.4f}, figures in {result.dir.figures}")
        return 0
    if args.command == "validate":
        import yaml

        from optolab.protocol.describe import describe_protocol

        protocol = load_protocol(args.protocol, seed=args.seed)
        print("\n".join(describe_protocol(protocol)))
        if args.resolved:
            print("---")
            print(yaml.safe_dump(protocol.resolved(), sort_keys=False), end="")
        return 0
    if args.command == "sites":
        from optolab.protocol.describe import site_shapes

        protocol = load_protocol(args.protocol)
        rows = site_shapes(protocol)
        width = max(len(n) for n, _ in rows)
        print(f"{'hook':<{width}}  shape (dim 0 = batch)")
        for name, shape in rows:
            print(f"{name:<{width}}  [batch, {', '.join(map(str, shape[1:]))}]")
        return 0
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "llc":
        return _llc(args)
    if args.command == "tasks":
        return _tasks(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "discover":
        return _discover(args)
    if args.command == "export":
        return _export(args)
    if args.command == "report":
        from optolab.experiments.report import write_report

        for path in write_report(args.sweep_dir):
            print(path)
        return 0
    if args.command == "plot":
        from optolab.api import open_run

        for path in open_run(args.run_dir).plot():
            print(path)
        return 0
    raise AssertionError(args.command)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from optolab.api import open_run
    from optolab.model.export import save

    run = open_run(args.run_dir)
    step = args.step if args.step is not None else (run.checkpoint_steps or [None])[-1]
    model = run.model(step)  # refuses a run without checkpoints, or an unknown step, in one line
    out = Path(args.out) if args.out else run.path.parent / f"{run.path.name}_tl_step{step}.safetensors"
    save(model, out)
    print(f"{out} (+ .json): load with optolab.model.export.load(PATH), a TransformerLens HookedTransformer")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """``optolab evaluate``: a protocol's clamps on a saved model, its measures to a CSV."""
    from pathlib import Path

    import pandas as pd
    import torch

    from optolab.core.lock import DirLock
    from optolab.experiments.posthoc import accuracy_table, default_out, evaluate_checkpoint, resolve_checkpoint
    from optolab.protocol.loader import load_protocol

    torch.set_num_threads(1)
    protocol = load_protocol(args.protocol)
    weights, run_dir, _ = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else default_out(run_dir, protocol, weights)
    if out.is_dir():
        raise OptolabError(f"'{out}' is a folder; --out names the CSV file to write.", field="--out",
                           fix=f"pass a file name, e.g. {out / 'posthoc.csv'}.")
    # writing into a run directory: not while a run writes there
    inside = run_dir is not None and out.resolve().is_relative_to(run_dir.resolve())
    lock = DirLock(run_dir) if inside else None
    try:
        df = evaluate_checkpoint(protocol, args.checkpoint)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        if inside:  # optolab wrote it: --overwrite may delete it (optolab.training.rundir)
            from optolab.training.rundir import record

            record(run_dir, out)
    finally:
        if lock is not None:
            lock.release()
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(accuracy_table(df))
    print(f"all measures written to {out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """``optolab sweep``: train what is unfinished (or, with ``--dry-run``, print the plan)."""
    from optolab.experiments.sweep import run_sweep

    if args.dry_run:
        return _sweep_dry_run(args)
    status = run_sweep(args.sweep, args.out, workers=args.workers, executor=args.executor,
                       address=args.address, pack=args.pack, max_pack=args.max_pack,
                       max_runs=args.max_runs, device=args.device)
    done = sum(v == "done" for v in status.values())
    skipped = sum(v == "skipped" for v in status.values())
    failed = {rid: v for rid, v in status.items() if v.startswith("failed")}
    print(f"{done} runs trained, {skipped} already finished, {len(failed)} failed; written to {args.out}")
    for rid, v in failed.items():
        print(f"  {rid}: {v}", file=sys.stderr)
    if failed:
        print("Re-run the same command to retry interrupted runs (finished and diverged ones are skipped).",
              file=sys.stderr)
    return 1 if failed else 0


def _discover(args: argparse.Namespace) -> int:
    """``optolab discover``: the stages and the formation map (or, with ``--dry-run``, the plan)."""
    from optolab.experiments import discover

    if args.dry_run:
        print("\n".join(discover.plan(args.file, workers=args.workers)))
        return 0
    discover.run_discover(args.file, args.out, workers=args.workers)
    print(f"formation map written to {args.out}/formation_map.md")
    return 0


def _sweep_dry_run(args: argparse.Namespace) -> int:
    """``optolab sweep --dry-run``: the runs, how they pack, and each job's estimated CPU-minutes."""
    from optolab.experiments.cost import estimate, makespan
    from optolab.experiments.sweep import plan_sweep

    spec, runs, status, jobs, workers = plan_sweep(args.sweep, args.out, workers=args.workers, pack=args.pack,
                                                max_runs=args.max_runs, max_pack=args.max_pack)
    for rid in runs:
        print(rid + ("  (finished)" if rid in status else ""))
    seconds, _ = estimate(runs, jobs)
    print(f"trains as {len(jobs)} job(s) on {workers} worker(s) (--pack {args.pack}):")
    for job, sec in zip(jobs, seconds):
        print("  " + " + ".join(job) + f"  (about {sec / 60:.1f} CPU-min)")
    bound = any(runs[r].protocol.train.stop for job in jobs for r in job)
    print(f"estimated total (cost model calibrated just now, optolab.experiments.cost): about {sum(seconds) / 60:.1f} "
          f"CPU-min, about {makespan(seconds, workers) / 60:.1f} min wall on {workers} worker(s)"
          + (" (an upper bound: runs stop at their answer)" if bound else ""))
    later = [rid for rid in runs if rid not in status and not any(rid in job for job in jobs)]
    if later:
        why = "with dense evals around the reference's loss drop" if spec.dense_evals is not None else \
            "capped at a multiple of the reference's crossing (stop_at_answer)"
        print(f"then {len(later)} run(s) {why}, once it has finished")
    return 0


def _llc(args: argparse.Namespace) -> int:
    import torch

    from optolab.experiments import llc as posthoc
    from optolab.experiments.runs import open_run

    torch.set_num_threads(1)
    run = open_run(args.run_dir)
    spec = posthoc.base_spec(run, {
        "every": args.every, "heads": args.heads, "chains": args.chains, "draws": args.draws,
        "burn_in": args.burn_in, "step_size": args.step_size, "nbeta": args.nbeta,
        "localization": args.localization, "batch_size": args.batch_size,
        "clamps": False if args.no_clamps else None})
    if args.calibrate:
        df, folder = posthoc.calibrate(run.path, spec, args.step, args.step_sizes or posthoc.STEP_SIZES,
                                       args.nbetas or posthoc.NBETAS)
        print(df.to_string(index=False))
        print(f"calibration written to {folder} (calibration.csv, traces.png)")
        return 0
    df, folder = posthoc.curve(run.path, spec, args.steps)
    print(f"{len(df)} estimates in {folder} (estimates.jsonl, traces_*.npz, llc.png)")
    return 0


def _is_toy(path: str) -> bool:
    from optolab.protocol.loader import read_yaml

    data, _ = read_yaml(path, "protocol")
    return data.get("kind") == "toy_tensor"


def _toy(args: argparse.Namespace) -> int:
    from optolab.experiments.toy import describe_toy, load_toy, run_toy

    protocol = load_toy(args.protocol)
    print("\n".join(describe_toy(protocol)))
    if args.command == "validate":
        return 0
    out = args.out or f"results/{protocol.name}"
    summary = run_toy(protocol, out, overwrite=args.overwrite)
    for name, c in summary["conditions"].items():
        print(f"{name}: median {c['median_iterations']} iterations to {summary['threshold']:g} × initial loss "
              f"(by seed: {c['iterations_by_seed']})")
    print(f"run written to {out}")
    return 0


def _load_task(path: str):
    """A task from a task spec YAML, or from a protocol (its ``task:``)."""
    from optolab.protocol.loader import load_protocol, read_yaml
    from optolab.tasks import make_task
    from optolab.testing.contract import as_task

    data, _ = read_yaml(path, "task spec")
    if "task" in data and "kind" not in data and "generator" not in data:
        return make_task(load_protocol(path).task)
    return as_task(path)


def _tasks(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    if args.tasks_command == "list":
        from optolab.tasks import BUILTIN, known_kinds

        for kind in known_kinds():
            origin = "built-in" if kind in BUILTIN else "entry point"
            print(f"{kind}  ({origin})")
        return 0
    task = _load_task(args.task)
    if args.tasks_command == "show":
        from optolab.tasks.show import show_task

        print("\n".join(show_task(task, n=args.n, seed=args.seed)))
        return 0
    from optolab.testing.contract import check_task

    print(check_task(task, max_batch_ms=args.max_batch_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
