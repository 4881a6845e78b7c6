"""Post-hoc mode: apply a protocol's clamps to a saved model and report the measures.

Rules:
- ``optolab evaluate PROTOCOL --checkpoint RUN_DIR|FILE`` loads the checkpoint into the
  protocol's model (shapes must match) and evaluates it on the protocol's fixed eval sets.
- Conditions: the protocol's own ``clamps`` are condition ``base``; every entry of
  ``conditions: {name: [clamps…]}`` is evaluated as ``base`` + its clamps. Windows are ignored
  (they describe training time): every clamp whose ``apply_at`` includes evaluation acts.
- Output: a tidy table (``condition`` + the run columns) written to
  ``--out`` (default ``RUN_DIR/posthoc/<protocol name>.csv``); nothing else is touched.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from optolab.clamps.engine import ClampForward
from optolab.measures.evaluate import EvalSet, evaluate
from optolab.model.checkpoint import find_checkpoint, load_weights
from optolab.model.forward import PlainForward
from optolab.model.transformer import build_model
from optolab.protocol.conditions import condition_protocols, plan_condition
from optolab.protocol.schema import Protocol
from optolab.tasks import make_task


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None, int | None]:
    """``(weights file, run dir or None, step or None)``."""
    p, run_dir = find_checkpoint(path, None, "--checkpoint")
    try:
        step = int(p.name.split(".")[0].split("_")[1])
    except (IndexError, ValueError):
        step = None
    return p, run_dir, step


def evaluate_checkpoint(protocol: Protocol, checkpoint: str | Path) -> pd.DataFrame:
    weights, _run_dir, step = resolve_checkpoint(checkpoint)
    task = make_task(protocol.task)
    cfg = protocol.model_config_for(task)
    model = build_model(cfg, 0)
    load_weights(weights, model)
    model.eval()
    evals = EvalSet.build(task, protocol.measures, protocol.seeds.eval, cfg.n_ctx)
    total = protocol.train.total_steps
    frames = []
    for name, p in condition_protocols(protocol).items():
        if not p.clamps:
            forward = PlainForward()
        else:
            plan = plan_condition(p, name, len(protocol.clamps), task, cfg).posthoc()
            forward = ClampForward(plan, backend=p.train.clamp_engine, seeds=(p.seeds.init, p.seeds.data))
        with torch.no_grad():
            rows = evaluate(model, task, p.measures, evals, forward, step=total)
        frame = pd.DataFrame(rows)
        frame.insert(0, "condition", name)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df.insert(1, "checkpoint_step", step)
    return df


def accuracy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Condition × split accuracy (and the main split's loss), in condition order."""
    whole = df[df["layer"].isna() & df["metric"].isin(["acc", "loss"])]
    table = whole.pivot_table(index="condition", columns=["metric", "split"], values="value", sort=False)
    return table


def default_out(run_dir: Path | None, protocol: Protocol, checkpoint: Path) -> Path:
    base = run_dir if run_dir is not None else checkpoint.parent
    return base / "posthoc" / f"{protocol.name}.csv"


__all__ = ["accuracy_table", "evaluate_checkpoint", "resolve_checkpoint"]
