"""A sweep's live progress: runs and steps done, and an ETA, from the first minute; also written
to ``OUT/progress.json`` for another terminal (``watch cat OUT/progress.json``).

Rules:
- A thread of the sweep's process reads, every ``interval`` seconds, each training run's last
  metrics row (the tail of ``metrics.jsonl``: the step of its latest eval) or its
  ``summary.json`` (finished, or stopped at its answer: its remaining steps leave the total).
  Nothing is asked of the workers, so packing and executors do not matter.
- ETA = the steps left / the rate of steps since this invocation began (steps of runs that
  resumed count from where they were). With stop-at-answer, steps left count to the budget, so
  the ETA is an upper bound and says so.
- ``progress.json``: ``{updated, elapsed_s, runs: {total, finished, running, waiting}, steps:
  {done, total}, eta_s, eta_is_upper_bound}``, replaced atomically.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from optolab.training.rundir import write_atomic


def _last_step(run_dir: Path) -> tuple[int, bool, int | None]:
    """``(step of the last eval (-1: none yet), finished, the step it stopped at)``."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            return int(s.get("final_step", 0) or 0), True, (s.get("stopped") or {}).get("step")
        except (OSError, ValueError):
            pass
    log = run_dir / "metrics.jsonl"
    try:
        with log.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"]), False, None
            except (ValueError, KeyError):
                continue
    except OSError:
        pass
    return -1, False, None


class LiveProgress:
    def __init__(self, out: Path, totals: dict[str, int], upper_bound: bool, interval: float = 5.0,
                 print_every: float = 60.0, stream=None) -> None:
        self.out, self.totals, self.upper = out, totals, upper_bound
        self.interval, self.print_every = interval, print_every
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        self.first = self.poll(write=False)["steps"]["done"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="optolab-progress")

    def poll(self, write: bool = True) -> dict:
        done = finished = running = 0
        total = 0
        for rid, budget in self.totals.items():
            step, ended, stopped = _last_step(self.out / rid)
            if ended:
                finished += 1
                total += step if stopped is not None else budget
                done += step if stopped is not None else budget
            else:
                total += budget
                done += max(step, 0)
                running += step >= 0  # its first eval (step 0) is written: it is training
        elapsed = time.monotonic() - self.t0
        rate = (done - getattr(self, "first", done)) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else None
        view = {"updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(elapsed, 1),
                "runs": {"total": len(self.totals), "finished": finished, "running": running,
                         "waiting": len(self.totals) - finished - running},
                "steps": {"done": done, "total": total}, "eta_s": None if eta is None else round(eta, 1),
                "eta_is_upper_bound": self.upper}
        if write:
            write_atomic(self.out / "progress.json", json.dumps(view, indent=2) + "\n")
        return view

    def line(self, v: dict) -> str:
        eta = "ETA unknown yet" if v["eta_s"] is None else \
            f"{'at most ' if self.upper else 'about '}{v['eta_s'] / 60:.1f} min left"
        r, s = v["runs"], v["steps"]
        return (f"[sweep] runs {r['finished']}/{r['total']} finished, {r['running']} training; steps "
                f"{s['done']:,}/{s['total']:,}; {eta}")

    def _loop(self) -> None:
        last_print = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                v = self.poll()
            except OSError:
                continue
            if time.monotonic() - last_print >= self.print_every:
                print(self.line(v), file=self.stream, flush=True)
                last_print = time.monotonic()

    def __enter__(self) -> LiveProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.poll()
        except OSError:
            pass
