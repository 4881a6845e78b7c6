"""The toy model of Singh et al. (2024, Fig 5a): learning T = a⊗b⊗c, with clamps (ANCHORS T6).

Rules (following the authors' ``simple_model_solver.py``):
- True vectors a, b, c ∈ R^dim have N(0, 1) entries; the model has its own a, b, c with N(0, 1)
  entries (separate draws), predicts their outer product, and is trained by plain gradient
  descent on ``0.5 · mean((â⊗b̂⊗ĉ − T)²)`` with learning rate ``lr``.
- A condition clamps some of the model's vectors to their true values, at initialisation and
  after every step — the toy analogue of clamping a subcircuit. ``none`` / ``c`` / ``b, c``
  remove the plateau step by step.
- Learning time: the first iteration at which the loss is below ``threshold`` × the run's own
  initial loss (ANCHORS §4 "iterations to 10 % of initial loss"); ``null`` if never. A
  condition's median is the lower median over seeds, counting "never" as later than any time.
- Everything is float64 and seeded by ``torch.Generator`` (the authors' JAX keys cannot be
  reproduced in torch), so numbers match the paper in ordering, not digit for digit.
- A run directory holds ``protocol.yaml`` (resolved), ``meta.json``, ``metrics.csv`` (one row
  per condition, seed and iteration: loss and the misalignment 1 − cos²(â, a) of each vector),
  ``summary.json`` and ``figures/loss.png`` (:data:`TOY_FILES`), written under the folder's lock.
  A folder holding anything else, or no toy run's ``protocol.yaml``, is refused with nothing
  touched, ``--overwrite`` or not; ``--overwrite`` replaces a toy run's own files. Without it, the
  same protocol's finished run is returned as it is, and another protocol's is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
import yaml
from pydantic import Field, model_validator

from optolab.core.counts import PosCount, Seed
from optolab.core.errors import OptolabError, SpecError
from optolab.core.strict import StrictModel

Vector = Literal["a", "b", "c"]


class ToyProtocol(StrictModel):

    kind: Literal["toy_tensor"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    description: str = ""
    dim: int = Field(20, ge=1, le=200, description="length of a, b and c (T has dim³ entries)")
    lr: float = Field(1.0, gt=0)
    iterations: PosCount = Field(1000, le=1_000_000)
    threshold: float = Field(0.1, gt=0, lt=1, description="learned when loss < threshold × initial loss")
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    conditions: dict[str, list[Vector]] = Field(
        default_factory=lambda: {"none": [], "clamp_c": ["c"], "clamp_bc": ["b", "c"]},
        description="condition name → vectors clamped to their true values")

    @model_validator(mode="after")
    def _check(self) -> ToyProtocol:
        if not self.conditions:
            raise SpecError("conditions", "conditions is empty.", "add e.g. none: []")
        for name, clamped in self.conditions.items():
            if len(set(clamped)) != len(clamped):
                raise SpecError(f"conditions.{name}", f"condition '{name}' lists a vector twice: {clamped}.",
                                "list each of a, b, c at most once.")
            if len(clamped) == 3:
                raise SpecError(f"conditions.{name}", f"condition '{name}' clamps a, b and c: nothing is left to learn.",
                                "drop one of them.")
        return self


def train_toy(dim: int, lr: float, iterations: int, clamped: list[str], seed: int) -> pd.DataFrame:
    """Loss and per-vector misalignment at every iteration (0 = initial) of one run."""
    g = torch.Generator().manual_seed(int(seed))
    true = {v: torch.randn(dim, generator=g, dtype=torch.float64) for v in "abc"}
    learned = {v: torch.randn(dim, generator=g, dtype=torch.float64) for v in "abc"}
    for v in clamped:
        learned[v] = true[v].clone()
    target = torch.einsum("i,j,k->ijk", true["a"], true["b"], true["c"])
    params = {v: learned[v].requires_grad_(v not in clamped) for v in "abc"}
    rows = []
    for it in range(iterations + 1):
        pred = torch.einsum("i,j,k->ijk", params["a"], params["b"], params["c"])
        loss = 0.5 * ((pred - target) ** 2).mean()
        with torch.no_grad():
            mis = {f"misalign_{v}": float(1 - torch.dot(params[v], true[v]) ** 2
                                          / (params[v].dot(params[v]) * true[v].dot(true[v])))
                   for v in "abc"}
        rows.append({"iteration": it, "loss": float(loss.detach()), **mis})
        if it == iterations:
            break
        grads = torch.autograd.grad(loss, [params[v] for v in "abc" if v not in clamped])
        with torch.no_grad():
            for v, grad in zip([v for v in "abc" if v not in clamped], grads):
                params[v] = (params[v] - lr * grad).requires_grad_(True)
    return pd.DataFrame(rows)


def time_to_fraction(losses: pd.Series, fraction: float) -> int | None:
    below = losses[losses < fraction * losses.iloc[0]]
    return int(below.index[0]) if len(below) else None


def load_toy(path: str | Path) -> ToyProtocol:
    from optolab.protocol.loader import read_spec

    return read_spec(path, "protocol", ToyProtocol)[0]


TOY_FILES = ("protocol.yaml", "meta.json", "metrics.csv", "summary.json", "figures/loss.png")


def _existing(out: Path, protocol: ToyProtocol, overwrite: bool) -> dict | None:
    """What ``out`` already holds (module rules): the finished run's summary to return, or None
    to write the run; refused, with nothing touched, when it holds anything a toy run did not
    write or a toy run of another protocol (unless ``overwrite``)."""
    from optolab.core.lock import LOCK_NAME

    if not out.exists():
        return None
    if not out.is_dir():
        raise OptolabError(f"'{out}' is a file, not a folder.", field="--out", fix="choose a new folder for the run.")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    if not files:
        return None
    try:
        record = yaml.safe_load((out / "protocol.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        record = None
    foreign = [f for f in files if f not in TOY_FILES]
    if foreign or not isinstance(record, dict) or record.get("kind") != "toy_tensor":
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "") if foreign else "and no toy run's protocol.yaml"
        raise OptolabError(f"'{out}' holds files a toy run did not write ({shown}); nothing was changed.",
                           field="--out", fix="choose another --out (--overwrite replaces only a toy run's own files).")
    if overwrite:
        return None
    if record != protocol.model_dump(mode="json"):
        raise OptolabError(f"'{out}' holds a toy run of a different protocol.", field="--out",
                           fix="choose another --out, or pass --overwrite to redo it there.")
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    return None  # the same protocol, unfinished: the toy keeps no checkpoints, so it trains again


def run_toy(protocol: ToyProtocol, out: str | Path, overwrite: bool = False) -> dict:
    from optolab.core.lock import DirLock

    out = Path(out)
    done = _existing(out, protocol, overwrite)
    if done is not None:
        return done
    lock = DirLock(out, "toy run")  # one writer per run directory
    try:
        return _write_run(protocol, out)
    finally:
        lock.release()


def _write_run(protocol: ToyProtocol, out: Path) -> dict:
    from optolab.training.rundir import environment

    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "protocol.yaml").write_text(yaml.safe_dump(protocol.model_dump(mode="json"), sort_keys=False))
    (out / "meta.json").write_text(json.dumps(environment(), indent=2))
    frames = []
    for name, clamped in protocol.conditions.items():
        for seed in protocol.seeds:
            df = train_toy(protocol.dim, protocol.lr, protocol.iterations, clamped, seed)
            frames.append(df.assign(condition=name, seed=seed))
    metrics = pd.concat(frames, ignore_index=True)
    metrics.to_csv(out / "metrics.csv", index=False)
    summary: dict = {"name": protocol.name, "threshold": protocol.threshold, "conditions": {}}
    for name, group in metrics.groupby("condition", sort=False):
        times = {int(s): time_to_fraction(g.set_index("iteration").loss, protocol.threshold)
                 for s, g in group.groupby("seed")}
        # lower median, counting "never" as later than everything
        ranked = sorted(times.values(), key=lambda t: math.inf if t is None else t)
        median = ranked[(len(ranked) - 1) // 2]
        summary["conditions"][name] = {"clamped": protocol.conditions[name], "iterations_by_seed": times,
                                       "median_iterations": median}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(metrics, protocol, out / "figures" / "loss.png")
    return summary


def _plot(metrics: pd.DataFrame, protocol: ToyProtocol, path: Path) -> None:
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    rel = metrics.assign(rel_loss=metrics.groupby(["condition", "seed"]).loss.transform(lambda s: s / s.iloc[0]))
    sns.lineplot(data=rel, x="iteration", y="rel_loss", hue="condition", errorbar=("pi", 100), ax=ax)
    ax.axhline(protocol.threshold, ls="--", lw=1, color="grey", label=f"{protocol.threshold:g} × initial")
    ax.set(yscale="log", ylabel="loss / initial loss", title="Toy model T = a⊗b⊗c: clamps shorten the plateau")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def describe_toy(protocol: ToyProtocol) -> list[str]:
    lines = [f"Toy protocol '{protocol.name}': {protocol.description}".rstrip(": "),
             f"T = a⊗b⊗c with dim {protocol.dim} ({protocol.dim ** 3:,} entries); gradient descent, lr "
             f"{protocol.lr:g}, {protocol.iterations:,} iterations, seeds {protocol.seeds}.",
             f"Learning time: first iteration with loss below {protocol.threshold:g} × the initial loss."]
    for name, clamped in protocol.conditions.items():
        what = ", ".join(clamped) + " clamped to the true values" if clamped else "nothing clamped"
        lines.append(f"Condition {name}: {what}.")
    return lines


__all__ = ["ToyProtocol", "describe_toy", "load_toy", "run_toy", "time_to_fraction", "train_toy"]
