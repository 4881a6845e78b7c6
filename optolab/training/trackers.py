"""Experiment trackers: every metrics row and figure of a run, also in TensorBoard or Weights &
Biases (``train.track: [tensorboard, wandb]``), so a sweep can be watched live in the tools
researchers already use.

Rules:
- Off by default. ``train.track`` is not part of a run's identity (as ``train.device``): turning
  a tracker on for a resumed run is allowed. The libraries are optional extras
  (``pip install 'optolab[track]'``), imported only when a run asks for them; a missing one is
  one clear error before the run starts.
- Where: TensorBoard writes event files to ``RUN_DIR/tensorboard/``; W&B runs offline by default
  (``RUN_DIR/wandb/``, synced later with ``wandb sync``), online when ``WANDB_MODE=online``; its
  project is ``$WANDB_PROJECT`` or ``optolab``, its run name the protocol's, its config the
  resolved protocol. Both folders belong to the run (``--overwrite`` clears them).
- What: each eval's rows as scalars at the eval's step, tagged ``split/metric`` for whole-model
  values and ``split/metric/L<layer>H<head>`` (``…/L<l>H<h>->L<l'>H<h'>`` between two heads) per
  head; the run's figures as images when they are written. The run's own files stay the record.
- A tracker that fails — when it starts (``RUN_DIR/tensorboard`` is a file, a library that
  fails at import) or while a run trains (a full disk, a lost connection) — is dropped (closed
  where it was open) and the run goes on: tracking must never cost a result. Each failure is
  one warning line on stderr and one line of ``tracker_failures`` in ``meta.json``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from optolab.core.errors import OptolabError

TRACKERS = ("tensorboard", "wandb")


def _tag(row: dict) -> str:
    tag = f"{row['split']}/{row['metric']}"
    if row.get("layer") is not None and not (isinstance(row["layer"], float) and math.isnan(row["layer"])):
        tag += f"/L{int(row['layer'])}"
        if row.get("head") is not None:
            tag += f"H{int(row['head'])}"
        if row.get("src_layer") is not None:
            tag = f"{row['split']}/{row['metric']}/L{int(row['src_layer'])}H{int(row['src_head'])}" \
                  f"->L{int(row['layer'])}H{int(row['head'])}"
    return tag


class Tracker:
    """One tracker of one run."""

    name = ""

    def scalars(self, step: int, rows: Iterable[dict]) -> None: ...

    def images(self, step: int, paths: Sequence[Path]) -> None: ...

    def close(self) -> None: ...


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, resolved: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, rows: Iterable[dict]) -> None:
        for row in rows:
            value = row.get("value")
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(_tag(row), value, step)
        self.writer.flush()

    def images(self, step: int, paths: Sequence[Path]) -> None:
        import matplotlib.image

        for p in paths:
            self.writer.add_image(f"figures/{p.stem}", matplotlib.image.imread(str(p))[..., :3], step,
                                  dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, resolved: dict) -> None:
        import wandb

        self.wandb = wandb
        # one W&B run per run directory: a resumed run and its figures (logged after training)
        # continue it rather than starting another
        run_id = "optolab-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "optolab"), name=resolved.get("name"),
                              id=run_id, resume="allow", dir=str(run_dir), config=resolved,
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")

    def scalars(self, step: int, rows: Iterable[dict]) -> None:
        data = {_tag(r): r["value"] for r in rows if r.get("value") is not None and math.isfinite(r["value"])}
        self.run.log(data, step=step)

    def images(self, step: int, paths: Sequence[Path]) -> None:
        self.run.log({f"figures/{p.stem}": self.wandb.Image(str(p)) for p in paths}, step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": (TensorBoard, "torch.utils.tensorboard", "tensorboard"), "wandb": (WandB, "wandb", "wandb")}


def require(names: Sequence[str]) -> None:
    """Refuse, before a run starts, a tracker whose library is not installed."""
    import importlib.util

    for name in names:
        _, _, package = KINDS[name]
        if importlib.util.find_spec(package) is None:
            raise OptolabError(f"train.track asks for {name}, but the '{package}' package is not installed.",
                               field="train.track", fix="pip install 'optolab[track]', or remove it from train.track.")


class Trackers:
    """The run's trackers; each call goes to every tracker still open (see the module rules)."""

    def __init__(self, names: Sequence[str], run_dir: Path, resolved: dict,
                 after: str = "the run goes on (meta.json lists it under tracker_failures)") -> None:
        """``after``: what the warning of a dropped tracker says happens next."""
        require(names)
        self.after = after
        self.open: list[Tracker] = []
        self.failures: list[str] = []
        for n in names:
            try:
                self.open.append(KINDS[n][0](run_dir, resolved))
            except Exception as e:  # noqa: BLE001 - a tracker must never cost a result
                self._drop(n, e)

    def _drop(self, name: str, err: Exception, tracker: Tracker | None = None) -> None:
        why = f"{type(err).__name__}: {' '.join(str(err).split())}"
        self.failures.append(f"{name}: {why}")
        logging.getLogger("optolab").warning("optolab: warning: tracker %s dropped (%s); %s.", name, why, self.after)
        if tracker is not None:
            self.open.remove(tracker)
            try:
                tracker.close()
            except Exception:  # noqa: BLE001 - already failing; the run goes on
                pass

    def _each(self, fn) -> None:
        for t in list(self.open):
            try:
                fn(t)
            except Exception as e:  # noqa: BLE001 - a tracker must never cost a result
                self._drop(t.name, e, t)

    def scalars(self, step: int, rows: list[dict]) -> None:
        self._each(lambda t: t.scalars(step, rows))

    def images(self, step: int, paths: Sequence[Path]) -> None:
        self._each(lambda t: t.images(step, paths))

    def close(self) -> None:
        self._each(lambda t: t.close())
        self.open = []
