"""Executors: where the runs of a sweep train.

Rules:
- An executor gets *jobs* — a single run, or several runs packed into an ensemble
  (:mod:`optolab.training.ensemble`) — and a sweep directory, trains every run into ``OUT/<run id>`` and
  returns ``{run id: "done" | "failed: <one line>"}``. One failed run never stops the others;
  the caller decides what a failure means.
- Every job trains in its own process with one torch thread, so jobs never share state; a run
  trained alone equals ``optolab run`` exactly, a packed run within the ensemble tolerance.
- ``local`` (the default): a process pool on this machine, ``workers`` processes (default: the
  CPU count). Workers die with the sweep's process (:func:`die_with_parent`), and every run
  holds its directory's lock, so a re-run never races a survivor.
- ``ray``: Ray tasks of one CPU each. With an ``address`` (``--address``, or ``RAY_ADDRESS``
  in the environment) it connects to that cluster; without one it starts a local Ray instance
  with ``workers`` CPUs and shuts it down afterwards. An address that cannot be reached is one
  clear error within seconds, before anything is written.
- GPUs: a job trains on a GPU when its ``train.device`` is ``cuda`` (or ``auto`` where one is).
  ``local`` then starts its workers fresh (``spawn``: CUDA does not survive a ``fork``) and
  gives each worker one GPU in turn (``CUDA_VISIBLE_DEVICES``), so ``workers`` runs share the
  GPUs evenly; a job that names ``cuda:N`` keeps every GPU in view. ``ray`` asks for
  ``1 / runs_per_gpu`` of a GPU per such job (``num_gpus``), so Ray places that many on each.
- On a cluster every node must see the sweep directory at the same path (shared storage: NFS,
  Lustre, a mounted bucket) and have the same optolab installed; runs write there directly,
  and before any run is submitted a probe task on every node checks that it can read a file
  the driver just wrote there. Ray retries a task whose worker died; the retry resumes from the
  run's last checkpoint.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from optolab.core.errors import OptolabError

EXECUTORS = ("local", "ray")
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_PARENT_S = 1.0
RUNS_PER_GPU = 4  # a GPU job asks Ray for a quarter of a GPU: tiny models leave a GPU mostly idle


def train_one(protocol_data: dict, out: str, figures: bool = True) -> str:
    """One run, one torch thread. Takes plain data so it pickles under any start method."""
    import torch

    from optolab.experiments.runs import run
    from optolab.protocol.loader import validate_protocol

    torch.set_num_threads(1)
    run(validate_protocol(protocol_data), out, progress=False, plots=figures)
    return out


def train_job(members: list[tuple[dict, str]], figures: bool = True) -> dict[str, str]:
    """One job: a single run, or several packed into an ensemble (:mod:`optolab.training.ensemble`).
    ``{out: "done" | "failed: …"}``; a single run's failure raises instead, like ``train_one``.
    ``figures``: write each run's figures (a sweep's ``run_figures``; they cost seconds per run)."""
    import torch

    from optolab.core.errors import RunFailed
    from optolab.experiments.runs import open_run
    from optolab.protocol.loader import validate_protocol
    from optolab.training.ensemble import train_ensemble

    if len(members) == 1:
        return {train_one(*members[0], figures): "done"}
    torch.set_num_threads(1)
    results = train_ensemble([validate_protocol(d) for d, _ in members], [o for _, o in members])
    for (_, o), r in zip(members, results):
        if figures and not isinstance(r, RunFailed):
            open_run(o).plot()  # as optolab.experiments.runs.run does for a run trained alone
    return {o: ("failed: " + _one_line(r) if isinstance(r, RunFailed) else "done")
            for (_, o), r in zip(members, results)}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


Job = list[tuple[str, dict]]  # (run id, resolved protocol) of each member


def _collect(job: Job, out: Path, result: dict[str, str] | None, err: BaseException | None) -> dict[str, str]:
    if err is not None:
        return {rid: f"failed: {_one_line(err)}" for rid, _ in job}
    return {rid: result.get(str(out / rid), "done") for rid, _ in job}


class Progress:
    """One line on stderr each time a job ends: runs finished / running / failed and an ETA from
    the mean time per finished run so far (jobs differ in length, so it is a rough guide)."""

    def __init__(self, jobs: list[Job], workers: int, stream=None) -> None:
        self.total = sum(len(job) for job in jobs)
        self.workers, self.stream = workers, stream if stream is not None else sys.stderr
        self.done = self.failed = 0
        self.t0 = time.monotonic()

    def ended(self, result: dict[str, str]) -> None:
        self.failed += sum(v.startswith("failed") for v in result.values())
        self.done += sum(not v.startswith("failed") for v in result.values())
        ended = self.done + self.failed
        left = self.total - ended
        running = min(left, self.workers)
        eta = ""
        if ended and left:
            per = (time.monotonic() - self.t0) / ended
            eta = f", about {per * left / 60:.1f} min left"
        print(f"[sweep] {self.done}/{self.total} runs finished, {running} running, {self.failed} failed{eta}",
              file=self.stream, flush=True)


def _members(job: Job, out: Path) -> list[tuple[dict, str]]:
    return [(data, str(out / rid)) for rid, data in job]


def die_with_parent(parent: int) -> None:
    """In a pool worker: end when the sweep's process does, however it dies (a ``kill -9`` of the
    sweep must not leave workers training and racing the re-run). On Linux the kernel sends the
    worker SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); everywhere, a thread also watches
    the parent's pid. A killed worker's run keeps its last checkpoint; its lock dies with it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_PARENT_S)
        os._exit(1)

    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="optolab-watch-parent").start()


def _devices(jobs: list[Job]) -> set[str]:
    return {data.get("train", {}).get("device", "auto") for job in jobs for _rid, data in job}


def gpu_jobs(jobs: list[Job], n_gpus: int) -> bool:
    """Whether these jobs train on GPUs (see the module rules)."""
    return any(d.startswith("cuda") or (d == "auto" and n_gpus > 0) for d in _devices(jobs))


def may_use_gpus(jobs: list[Job]) -> bool:
    """Whether a job could train on a GPU, decided without touching CUDA (asking CUDA anything,
    even how many GPUs there are, makes every later ``fork`` unable to use it, and a CPU-only
    sweep forks): jobs that all say ``cpu`` cannot; ``auto`` can where torch is built with CUDA."""
    import torch

    devices = _devices(jobs)
    return any(d.startswith("cuda") for d in devices) or ("auto" in devices and torch.backends.cuda.is_built())


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_worker(parent: int, slots=None) -> None:
    """A pool worker's start: die with the parent; on a GPU sweep, see one GPU (the next slot)."""
    if slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get())
    die_with_parent(parent)


def run_local(jobs: list[Job], out: Path, workers: int, figures: bool = True) -> dict[str, str]:
    status: dict[str, str] = {}
    if workers > 1 and may_use_gpus(jobs):  # spawned, even where no GPU turns up: the query poisons fork
        import multiprocessing

        n_gpus = gpu_count()
        ctx = multiprocessing.get_context("spawn")
        slots = None
        if n_gpus and gpu_jobs(jobs, n_gpus) and not any(re.fullmatch(r"cuda:\d+", d) for d in _devices(jobs)):
            slots = ctx.Queue()
            for w in range(workers):
                slots.put(w % n_gpus)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=start_worker,
                                   initargs=(os.getpid(), slots))
        return _drain(pool, jobs, out, status, workers, figures)
    if workers == 1:
        progress = Progress(jobs, 1)
        for job in jobs:
            try:
                got = _collect(job, out, train_job(_members(job, out), figures), None)
            except Exception as e:  # noqa: BLE001 - one broken run must not stop the sweep
                got = _collect(job, out, None, e)
            status.update(got)
            progress.ended(got)
        return status
    pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
    return _drain(pool, jobs, out, status, workers, figures)


def _drain(pool: ProcessPoolExecutor, jobs: list[Job], out: Path, status: dict[str, str],
           workers: int, figures: bool = True) -> dict[str, str]:
    progress = Progress(jobs, workers)
    with pool:
        futures = {pool.submit(train_job, _members(job, out), figures): job for job in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                got = _collect(job, out, fut.result(), None)
            except Exception as e:  # noqa: BLE001 - including a worker killed mid-run
                got = _collect(job, out, None, e)
            status.update(got)
            progress.ended(got)
    return status


# -- Ray ---------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise OptolabError("--executor ray needs Ray, which is not installed.", field="--executor",
                           fix="pip install 'optolab[ray]' (or use --executor local).") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail fast on a ``host:port`` / ``ray://host:port`` nobody answers (Ray itself waits ~20 s)."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address.strip())
    if m is None:
        if address.strip() in ("auto", "local"):
            return
        raise OptolabError(f"Ray address '{address}' is not host:port, ray://host:port or 'auto'.",
                           field="--address", fix="give the head node as host:port, e.g. 10.0.0.5:6379.")
    host, port = m.group(1), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise OptolabError(
            f"cannot reach a Ray cluster at {address} ({e.strerror or type(e).__name__}).", field="--address",
            fix="start the head node there (`ray start --head`), check host and port, or drop --address "
                "(and unset RAY_ADDRESS) to start a local Ray instance.") from None


def connect_ray(address: str | None, workers: int):
    """``(ray, started_locally)``: connected to ``address`` or to a new local instance."""
    ray = _import_ray()
    if address:
        check_reachable(address)
        error, native_log = _quiet(lambda: ray.init(address=address, log_to_driver=False, logging_level="WARNING"))
        if error is not None:
            if AUTH_FAILURE.search(f"{error} {native_log}"):
                raise OptolabError(
                    f"the Ray cluster at {address} refused the connection: it uses token authentication and this "
                    "client sent no valid token.", field="--address",
                    fix="set RAY_AUTH_MODE=token and give the cluster's token (in ~/.ray/auth_token, or "
                        "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); recent Ray releases turn it on by default in "
                        "`ray start --head` (docs/sweeps-and-reports.md, Ray clusters).") from None
            if not isinstance(error, (ConnectionError, RuntimeError, TimeoutError, ValueError)):
                raise error
            raise OptolabError(f"could not connect to the Ray cluster at {address}: {_one_line(error)}",
                               field="--address", fix="check that the address is a Ray head node "
                               "(`ray status --address ...`) running a compatible Ray version.") from None
        return ray, False
    # Ray renices its workers to 15; on a machine of our own the runs are the work, so they
    # should not yield to whatever else runs there. Runs exchange no objects, hence the small store.
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", object_store_memory=80 * 2**20, _system_config={"worker_niceness": 0})
    return ray, True


AUTH_FAILURE = re.compile(r"Unauthenticated|InvalidAuthToken|AuthenticationError|authentication token", re.I)


def _quiet(fn) -> tuple[BaseException | None, str]:
    """Run ``fn`` with this process's stderr (file descriptor 2, where Ray's native code logs
    each failed retry) captured: ``(the exception it raised or None, what it logged)``. On
    success what it logged goes back to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        error = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - returned to the caller, which decides
            error = e
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if error is None and text:
        sys.stderr.write(text)
    return error, text


def _probe(path: str, token: str) -> tuple[str, bool]:
    p = Path(path)
    seen = p.is_file() and p.read_text() == token
    return socket.gethostname(), seen


def check_shared_storage(ray, out: Path) -> None:
    """Every alive node must read a token the driver just wrote into the sweep directory."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    probe_file = out / f".probe-{token}"
    probe_file.write_text(token)
    try:
        probe = ray.remote(num_cpus=0)(_probe)
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(probe_file.resolve()), token) for node in nodes]
        results = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    finally:
        probe_file.unlink(missing_ok=True)
    blind = sorted(host for host, seen in results if not seen)
    if blind:
        raise OptolabError(f"Ray nodes {blind} cannot see the sweep directory {out.resolve()}.", field="--out",
                           fix="put --out on storage shared by every node, mounted at the same path.")


def ray_gpus(jobs: list[Job], cluster_gpus: float, runs_per_gpu: int = RUNS_PER_GPU) -> float:
    """The share of a GPU each job asks Ray for: ``1 / runs_per_gpu`` for GPU jobs, else 0."""
    return 1.0 / runs_per_gpu if gpu_jobs(jobs, int(cluster_gpus)) else 0.0


def run_ray(jobs: list[Job], out: Path, ray, max_retries: int = 3, figures: bool = True) -> dict[str, str]:
    gpus = ray_gpus(jobs, ray.cluster_resources().get("GPU", 0))
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=max_retries)(train_job)
    resolved = out.resolve()
    refs = {remote.remote(_members(job, resolved), figures): job for job in jobs}
    status: dict[str, str] = {}
    progress = Progress(jobs, len(jobs))
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            job = refs[ready[0]]
            try:
                got = _collect(job, resolved, ray.get(ready[0]), None)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                got = _collect(job, resolved, None, cause if isinstance(cause, BaseException) else e)
            status.update(got)
            progress.ended(got)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return status


def ray_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None
