"""Stop at the answer: a run whose question is a crossing (a loss falling below a threshold, a
head score rising above one) ends once the crossing is seen plus a margin of evals, or, never
crossing, at a cap.

Rules:
- ``train.stop`` (:class:`~optolab.protocol.schema.StopAtAnswer`) names the metric, split,
  threshold and direction; a per-head score counts as crossed when the best head (of ``layer``,
  or of any layer) crosses. The rule is read at evals only, on the rows the eval just wrote, so
  a stopped run's metric rows are exactly the full run's rows up to its stop.
- **Answered**: the first eval at or past the threshold, then ``margin_evals`` more evals (so
  the curve past the crossing, which interpolation and the phase detector read, is there too).
- **Censored at the cap**: an eval at or past ``cap_sequences`` with no crossing yet stops the
  run; its time is "never, censored at that eval", as the statistics treat any run that never
  crossed (:mod:`optolab.experiments.stats`): counted, never dropped.
- A stopped run saves a checkpoint at its stop and writes ``summary.json`` with ``status:
  stopped`` and ``stopped: {reason: answered|cap, step, sequences, budget_steps}``. The rule is
  not part of the run's identity (``train.stop`` is in
  :data:`optolab.training.runbook.NOT_IDENTITY`), so the same protocol without it (or with
  another rule) resumes the run from that checkpoint to its full budget, bit-identically with an
  uninterrupted run (:func:`reopen` puts the finished files back as an unfinished run's).
- The state is a function of the rows alone (:meth:`StopRule.replay` rebuilds it on resume).
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Iterable

from optolab.training.rundir import RunDir

REASONS = ("answered", "cap")


class StopRule:
    """The stop decision of one run (see the module rules)."""

    def __init__(self, spec, main_split: str) -> None:
        self.spec = spec
        self.split = spec.split or main_split
        self.crossed_at: int | None = None  # the step of the first eval at or past the threshold
        self.evals_after = 0
        self.reason: str | None = None

    def _value(self, rows: Iterable[dict]) -> float | None:
        s = self.spec
        values = [r["value"] for r in rows
                  if r["split"] == self.split and r["metric"] == s.metric and r.get("src_layer") is None
                  and (s.layer is None or r.get("layer") == s.layer)]
        if not values:
            return None
        return min(values) if s.direction == "down" else max(values)

    def update(self, step: int, sequences: int, rows: Iterable[dict]) -> str | None:
        """Feed one eval's rows; the reason to stop now (``answered``/``cap``) or None."""
        if self.reason is not None:
            return self.reason
        s = self.spec
        if self.crossed_at is not None:
            self.evals_after += 1
        else:
            v = self._value(rows)
            if v is not None and (v <= s.threshold if s.direction == "down" else v >= s.threshold):
                self.crossed_at = step
        if self.crossed_at is not None and self.evals_after >= s.margin_evals:
            self.reason = "answered"
        elif self.crossed_at is None and s.cap_sequences is not None and sequences >= s.cap_sequences:
            self.reason = "cap"
        return self.reason

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the state from a resumed run's rows (evals in step order)."""
        by_step: dict[int, list[dict]] = {}
        for r in rows:
            by_step.setdefault(int(r["step"]), []).append(r)
        for step in sorted(by_step):
            evals = [r for r in by_step[step] if r["split"] == self.split]
            if evals:
                self.update(step, int(evals[0]["sequences"]), evals)
        self.reason = None  # a rule met before the resume point was met under another budget: go on


def stopped_summary(reason: str, step: int, batch_size: int, total: int) -> dict:
    return {"reason": reason, "step": step, "sequences": step * batch_size, "budget_steps": total}


def was_stopped(run: RunDir) -> bool:
    """Whether the run directory holds a run stopped at its answer (or cap)."""
    import json

    try:
        return json.loads(run.summary.read_text()).get("status") == "stopped"
    except (OSError, ValueError):
        return False


def reopen(run: RunDir) -> None:
    """Turn a stopped run's files back into an unfinished run's: the metrics log back from its
    gzip, the parquet table and ``summary.json`` removed (they are rewritten when it finishes)."""
    gz = run.path / "metrics.jsonl.gz"
    if gz.is_file() and not run.metrics_jsonl.is_file():
        tmp = run.path / "metrics.jsonl.tmp"
        with gzip.open(gz, "rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(run.metrics_jsonl)
        gz.unlink()
    for f in (run.metrics_parquet, run.summary):
        f.unlink(missing_ok=True)
