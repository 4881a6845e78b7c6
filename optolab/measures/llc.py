"""The local learning coefficient (LLC): how degenerate the loss is around a checkpoint's
weights, estimated by SGLD (Lau et al. 2023). Hoogland et al. 2024 read developmental stages off
its curve over training: it falls while previous-token heads form on a flat loss, and rises as
the induction circuit completes.

Method (what :func:`estimate` computes):
- ``chains`` SGLD chains start at the checkpoint's weights ``w*``. Each step is devinterp's
  ``SGMCMC.sgld`` update (the package's sampler, used as it is):
  ``w ← w − ε/2 (nβ ∇L_B(w) + γ (w − w*)) + N(0, ε)``, with ``ε = step_size``,
  ``γ = localization`` and ``L_B`` the run's training loss on a fresh batch ``B_t`` of the task.
- The batches are the run's training distribution at the checkpoint: what its training step
  after the checkpoint draws from (the task, or the phase of its ``data`` schedule), the SGLD
  step ``t``'s batch with a data seed made from ``(seed, t)`` (:func:`sample_batches`). The same
  batch at step ``t`` for every chain, and for every checkpoint in one phase, so chains and
  checkpoints differ only by the weights and the noise (each chain's noise from its own
  generator, seeded by ``(seed, chain)``). Same checkpoint + config = same numbers.
- Every forward goes through the run's Forward: an LLC *under the run's clamps* uses the same
  clamp program (patterns forced, heads ablated), and freezes keep frozen weights at ``w*``
  (the Forward's ``after_backward`` / ``after_update`` run around each SGLD step, as around
  Adam's). The clamps act as in the training step that follows the checkpoint (the last
  training step for the final checkpoint: :func:`clamp_step`): the LLC is a property of the
  loss the run was descending there. ``clamps: false`` samples the bare model.
- Per chain, ``LLC = nβ (mean_t L_{B_t}(w_t) − mean_t L_{B_t}(w*))`` over the ``draws`` after
  ``burn_in``. ``L_{B_t}(w*)`` is the loss of the checkpoint itself on the same batches (one
  extra forward per step, shared by the chains): the difference is paired, so batch-to-batch
  noise cancels. The estimate is the mean over chains; ``std`` their standard deviation.
- A *restricted* LLC (``heads``, e.g. ``L1H3``) moves only that head's slices of ``W_Q``,
  ``W_K``, ``W_V``, ``W_O`` (and its biases), through devinterp's parameter masks; everything
  else stays at ``w*``.
- Defaults (``step_size`` 1e-5, ``nbeta`` 3000, ``localization`` 100, 50 burn-in steps, 200
  draws, 4 chains) come from calibrating the Singh et al. task (docs/measures.md#llc): a chain
  must sample the checkpoint's neighbourhood, so its mean loss over the draws may sit at most
  ``EXCESS_TOL`` (0.1 nats) above the checkpoint's (:func:`health`). The LLC is nβ times that
  excess, so nβ must exceed the LLC / 0.1. On the main run at 4e5 sequences (loss 0.05) the
  former default (nβ 300, ε 1e-4) sampled 0.70 nats above the checkpoint (a plateau-level model:
  the curve compared plateau posteriors), nβ 1000 0.19–0.24, nβ 3000 0.09. At nβ 3000 a step of
  1e-4 overshoots (LLC 541 ± 89, 0.2 nats up) and 3e-5 leaves the quickstart's final basin
  (0.10 nats up, 274 ± 46); 1e-5 stays in both (0.086 and 0.066 nats up). devinterp's own
  default ``nβ = m / ln m`` (9.2 for a batch of 32 sequences) is hotter still (the sampled loss
  climbs from 0.003 to ~2, a model that has forgotten the task); ``nbeta: null`` still picks it.
  Step size, nβ and localization are calibrated once per model and task on one checkpoint
  (:func:`optolab.experiments.llc.calibrate`, ``optolab llc RUN_DIR --calibrate``) and then held
  fixed: an LLC curve compares checkpoints, so its hyperparameters must not change along it.
- The model passed in is never changed: chains run on a copy.

Why devinterp's optimizer and not its ``llc()``/``sample()``: devinterp 2.x's high-level sampler
takes a HuggingFace ``datasets.Dataset`` of ``input_ids`` with a per-token language-model loss
and writes zarr stores; optolab's tasks are generators of exemplar–label sequences with
continuous inputs and losses at a few positions. The SGLD update rule is the part that must be
right, and it is devinterp's; the loop around it is the ten lines of Lau et al.'s algorithm.
devinterp is an optional extra (``pip install optolab[llc]``), imported only here, when sampling.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from optolab.core.counts import PosCount, Seed
from optolab.core.errors import OptolabError
from optolab.core.strict import StrictModel
from optolab.tasks.base import IGNORE

HEAD = re.compile(r"^L(\d+)H(\d+)$")
HEAD_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")  # W_O is [h, e, d]; the others [d, h, e] / [h, e]


class LLCSpec(StrictModel):
    """``measures.llc``: when and how the LLC is estimated (see the module method)."""

    every: PosCount = Field(1, description="estimate at every N-th checkpoint (and the last)")
    chains: PosCount = Field(4, description="SGLD chains")
    draws: PosCount = Field(200, description="SGLD steps per chain that count (after burn_in)")
    burn_in: int = Field(50, ge=0, description="SGLD steps per chain before the draws")
    step_size: float = Field(1e-5, gt=0, description="SGLD step size ε")
    nbeta: float | None = Field(3000.0, gt=0, description="inverse temperature nβ (null: devinterp's m / ln m, m = batch_size)")
    localization: float = Field(100.0, ge=0, description="γ: pull towards the checkpoint's weights")
    batch_size: PosCount | None = Field(None, description="sequences per SGLD batch (default: train.batch_size)")
    heads: list[str] = Field(default_factory=list, description="also the restricted LLC of these heads, e.g. [L1H3]")
    clamps: bool = Field(True, description="sample under the run's clamp program (false: the bare model)")
    seed: Seed = Field(0, description="batches and noise")

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str]) -> list[str]:
        for h in v:
            if not HEAD.match(h):
                raise ValueError(f"'{h}' is not a head; name heads like L1H3 (layer 1, head 3)")
        return v


def clamp_step(step: int, total_steps: int) -> int:
    """The training step whose clamps and data the LLC at checkpoint ``step`` samples."""
    return max(0, min(step, total_steps - 1))


def nbeta_of(spec: LLCSpec, batch_size: int) -> float:
    if spec.nbeta is not None:
        return spec.nbeta
    from devinterp.utils import default_nbeta

    return float(default_nbeta(batch_size))


def require() -> None:
    """Refuse, in one line, when devinterp is not installed."""
    try:
        import devinterp.optim  # noqa: F401
    except ImportError:
        raise OptolabError("the LLC needs devinterp, which is not installed.", field="measures.llc",
                           fix="pip install 'optolab[llc]' (devinterp==2.0.1), or switch measures.llc off."
                           ) from None


def check_heads(heads: list[str], n_layers: int, n_heads: int, field: str = "measures.llc.heads") -> None:
    for h in heads:
        layer, head = map(int, HEAD.match(h).groups())
        if layer >= n_layers or head >= n_heads:
            raise OptolabError(f"head {h} is not in this model ({n_layers} layers × {n_heads} heads).", field=field,
                               fix=f"name heads L0H0 … L{n_layers - 1}H{n_heads - 1}.")


def head_masks(model: torch.nn.Module, head: str) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """The parameters one head owns and a mask of its slice in each (devinterp's ``mask``)."""
    layer, h = map(int, HEAD.match(head).groups())
    attn = model.blocks[layer].attn
    params, masks = [], []
    for name in HEAD_PARAMS:
        p = getattr(attn, name, None)
        if p is None:
            continue
        m = torch.zeros_like(p, dtype=torch.bool)
        if name == "W_O":
            m[h] = True
        elif name.startswith("b_"):
            m[h] = True
        else:
            m[:, h] = True
        params.append(p)
        masks.append(m)
    return params, masks


def batch_loss(forward, model, batch, step: int) -> torch.Tensor:
    """The run's training loss on one batch (as the trainer computes it)."""
    logits, _ = forward(model, batch, step=step, training=True)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE)


@dataclass
class Estimate:
    """One LLC estimate: per chain, with the sampler's loss traces."""

    target: str  # "model" or a head, e.g. "L1H3"
    llc_per_chain: np.ndarray  # [chains]
    traces: np.ndarray  # [chains, burn_in + draws]: L_{B_t}(w_t), before each update
    init_losses: np.ndarray  # [burn_in + draws]: L_{B_t}(w*)
    nbeta: float
    config: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.llc_per_chain))

    @property
    def std(self) -> float:
        return float(np.std(self.llc_per_chain, ddof=1)) if len(self.llc_per_chain) > 1 else 0.0

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.traces).all())

    def health(self) -> Health:
        return health(self.traces, self.init_losses, self.llc_per_chain, self.config["burn_in"])


# --- chain health -------------------------------------------------------------------------------

EXCESS_TOL = 0.1  # nats: how far above the checkpoint's loss a chain may sample and still be "near" it
TAU = 5.0  # draws per independent draw assumed by the drift test (SGLD traces are autocorrelated)
VERDICTS = ("ok", "negative", "drifting", "left basin", "diverged")  # from good to worst


@dataclass(frozen=True)
class Health:
    """Whether an estimate's chains sampled the checkpoint's basin (see :func:`health`)."""

    verdict: str  # the worst of the chains' verdicts (VERDICTS)
    chain_verdicts: list[str]
    excess: list[float]  # per chain: mean sampled loss over the draws − the checkpoint's (nats)
    trend: list[float]  # per chain: mean of the draws' last quarter − their first quarter (nats)
    checkpoint_loss: float  # the checkpoint's mean loss over the draws' batches

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "chain_verdicts": self.chain_verdicts, "excess": self.excess,
                "trend": self.trend, "checkpoint_loss": self.checkpoint_loss}

    def warning(self) -> str | None:
        """One line for anything but ``ok`` (what went wrong, what to do), else None."""
        worst = max(self.excess) if self.excess else float("nan")
        return {
            "diverged": "a chain diverged (its loss is not finite): lower the step size.",
            "left basin": (f"the chains sample {worst:.3g} nats above the checkpoint's loss "
                           f"({self.checkpoint_loss:.3g}; allowed {EXCESS_TOL}): they left its basin, so this is "
                           "not the checkpoint's LLC. Raise nβ (or lower the step size); optolab llc --calibrate."),
            "drifting": "the chains' loss still moves at the end of the draws: more burn-in or a larger step size.",
            "negative": ("negative LLC: SGLD found lower loss than the checkpoint's (it is not a local minimum, "
                         "e.g. early in training); the estimate means nothing here."),
        }.get(self.verdict)


def chain_verdict(trace: np.ndarray, init: np.ndarray, burn_in: int) -> tuple[str, float, float]:
    """``(verdict, excess, trend)`` of one chain (see :func:`health`)."""
    if not np.isfinite(trace).all():
        return "diverged", float("nan"), float("nan")
    draws, ref = trace[burn_in:], init[burn_in:]
    excess = float(draws.mean() - ref.mean())
    q = len(draws) // 4
    trend = float(draws[-q:].mean() - draws[:q].mean()) if q >= 1 else 0.0
    if excess > EXCESS_TOL:
        return "left basin", excess, trend
    if q >= 4:
        # the third and last quarters of the draws differ by more than 3 standard errors, the
        # errors from the draws' own scatter with neighbouring draws correlated (q / TAU
        # independent draws per quarter)
        third, last = draws[2 * q:3 * q], draws[3 * q:]
        se = float(np.sqrt((third.var(ddof=1) + last.var(ddof=1)) * TAU / q))
        if abs(last.mean() - third.mean()) > 3 * se:
            return "drifting", excess, trend
    if excess < 0:
        return "negative", excess, trend
    return "ok", excess, trend


def health(traces: np.ndarray, init_losses: np.ndarray, per_chain: np.ndarray, burn_in: int) -> Health:
    """Chain-health diagnostics of one estimate. Per chain, in this order:

    - ``diverged``: its loss trace is not finite.
    - ``left basin``: its mean sampled loss over the draws exceeds the checkpoint's loss on the same
      batches by more than ``EXCESS_TOL`` (0.1 nats). The LLC is nβ × this excess, so an excess
      that large means the posterior sampled is not the checkpoint's neighbourhood: on the Singh
      task the plateau's loss (ln 2) is 0.7 nats above a solved checkpoint's, and chains 0.7 nats
      up have forgotten the task.
    - ``drifting``: the mean of the draws' last quarter differs from the third quarter's by more
      than three standard errors (neighbouring draws counted as correlated: ``TAU``).
    - ``negative``: the excess is negative (SGLD found lower loss: the checkpoint is no minimum).
    - ``ok`` otherwise.

    The estimate's verdict is its worst chain's; ``negative`` also when the mean LLC is negative."""
    found = [chain_verdict(traces[c], init_losses, burn_in) for c in range(traces.shape[0])]
    verdicts = [v for v, _, _ in found]
    if np.isfinite(per_chain).all() and per_chain.mean() < 0:
        verdicts.append("negative")
    worst = max(verdicts, key=VERDICTS.index) if verdicts else "ok"
    return Health(worst, [v for v, _, _ in found], [e for _, e, _ in found], [t for _, _, t in found],
                  float(np.mean(init_losses[burn_in:])))


def llc_from_traces(traces: np.ndarray, init_losses: np.ndarray, nbeta: float, burn_in: int) -> np.ndarray:
    """Per chain: nβ (mean sampled loss − mean loss at w*) over the steps after burn-in."""
    return nbeta * (traces[:, burn_in:].mean(axis=1) - init_losses[burn_in:].mean())


def sample_batches(data, spec: LLCSpec, step: int, m: int) -> list:
    """The SGLD batches: ``data`` (a task, or a protocol's data schedule) at training ``step``,
    each SGLD step with its own data seed."""
    return [data.train_batch((spec.seed * 1_000_003 + t + 1) % 2**62, step, m)
            for t in range(spec.burn_in + spec.draws)]


def estimate(model: torch.nn.Module, data, forward, spec: LLCSpec, *, step: int, batch_size: int,
             target: str = "model", device: torch.device | None = None) -> Estimate:
    """The LLC of ``model`` at its weights (see the module method). ``data`` draws the training
    batches (the task, or the protocol's data schedule); ``step`` is the training step whose
    data and clamps the sampler uses (:func:`clamp_step`). ``forward`` is the run's
    Forward (clamps act as at training ``step``; a PlainForward for ``clamps: false``), one
    the caller closes afterwards: it meets one fresh copy of the model per chain."""
    from devinterp.optim import SGMCMC

    device = device or next(model.parameters()).device
    m = spec.batch_size or batch_size
    nbeta = nbeta_of(spec, m)
    n_steps = spec.burn_in + spec.draws
    batches = [b.to_device(device) for b in sample_batches(data, spec, step, m)]
    was_training = model.training
    with torch.no_grad():
        model.train()
        init = np.array([batch_loss(forward, model, b, step).item() for b in batches])
    traces = np.full((spec.chains, n_steps), np.nan)
    for c in range(spec.chains):
        w = _copy(model, device)
        if target == "model":
            groups = [{"params": [p for p in w.parameters() if p.requires_grad]}]
            masks = None
        else:
            params, masks = head_masks(w, target)
            groups = [{"params": params}]
        sampler = SGMCMC.sgld(groups, lr=spec.step_size, localization=spec.localization, nbeta=nbeta,
                              mask=[mk.to(device) for mk in masks] if masks is not None else None)
        gen = torch.Generator(device=device).manual_seed(_chain_seed(spec.seed, c))
        for t, b in enumerate(batches):
            loss = batch_loss(forward, w, b, step)
            traces[c, t] = loss.item()
            if not math.isfinite(traces[c, t]):
                break  # a diverged chain: its trace says where; the estimate is not finite
            w.zero_grad(set_to_none=True)
            loss.backward()
            forward.after_backward(w, step)
            sampler.step(noise_generator=gen)
            forward.after_update(w, step)
        del w, sampler
    model.train(was_training)
    per_chain = llc_from_traces(traces, init, nbeta, spec.burn_in)
    return Estimate(target, per_chain, traces, init, nbeta, spec.model_dump(mode="json"))


def _copy(model: torch.nn.Module, device) -> torch.nn.Module:
    """A fresh module with the model's weights (not a deepcopy: the run's model may carry its
    Forward's site hooks, which must not follow the copy)."""
    from optolab.model.transformer import build_model

    w = build_model(model.cfg, 0).to(device)
    w.load_state_dict(model.state_dict())
    return w.train()


def _chain_seed(seed: int, chain: int) -> int:
    return (seed * 1_000_003 + chain * 7919 + 1) % (2**63 - 1)


def estimates(model, data, forward, spec: LLCSpec, *, step: int, batch_size: int) -> list[Estimate]:
    """The whole-model LLC and each of ``spec.heads``' restricted LLCs."""
    return [estimate(model, data, forward, spec, step=step, batch_size=batch_size, target=t)
            for t in ["model", *spec.heads]]


def rows(found: list[Estimate]) -> list[dict]:
    """Metrics rows (split ``llc``): ``llc``, ``llc_std`` and ``llc_ok`` of the whole model;
    ``llc_head``, ``llc_head_std`` and ``llc_head_ok`` of each restricted head (with its layer
    and head). ``*_ok`` is 1 when the estimate's chain health says ``ok``, else 0."""
    out = []
    for e in found:
        whole = e.target == "model"
        layer, head = (None, None) if whole else map(int, HEAD.match(e.target).groups())
        name = "llc" if whole else "llc_head"
        ok = float(e.health().verdict == "ok")
        for metric, value in ((name, e.mean), (f"{name}_std", e.std), (f"{name}_ok", ok)):
            out.append({"split": "llc", "metric": metric, "layer": layer, "head": head, "value": value})
    return out


# --- files: RUN_DIR/measures/llc/ --------------------------------------------------------------

def save(folder, step: int, sequences: int, found: list[Estimate], source: str) -> None:
    """``estimates.jsonl`` (one line per target and checkpoint) and ``traces_<step>.npz`` (the
    sampler's loss traces per chain: the diagnostics devinterp's guidance asks to look at)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    with open(folder / "estimates.jsonl", "a") as f:
        for e in found:
            f.write(json.dumps({"step": step, "sequences": sequences, "target": e.target, "llc": e.mean,
                                "llc_std": e.std, "llc_per_chain": [float(x) for x in e.llc_per_chain],
                                "init_loss": float(e.init_losses[e.config["burn_in"]:].mean()),
                                "nbeta": e.nbeta, "finite": e.finite, "health": e.health().to_dict(), "source": source,
                                "config": e.config}) + "\n")
            arrays[f"{e.target}_traces"] = e.traces.astype(np.float32)
            arrays[f"{e.target}_init"] = e.init_losses.astype(np.float32)
    np.savez_compressed(folder / f"traces_{step:09d}.npz", **arrays)


def load(folder):
    """The estimates in ``folder`` (a run's ``RUN_DIR/measures/llc``) as a DataFrame (empty if none)."""
    import json
    from pathlib import Path

    import pandas as pd

    f = Path(folder) / "estimates.jsonl"
    if not f.is_file():
        return pd.DataFrame(columns=["step", "sequences", "target", "llc", "llc_std", "source"])
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return pd.DataFrame(recs)


def truncate(folder, last_step: int) -> None:
    """Forget estimates after ``last_step`` (a run resumed from that checkpoint recomputes them)."""
    import json
    from pathlib import Path

    f = Path(folder) / "estimates.jsonl"
    if not f.is_file():
        return
    keep = [line for line in f.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    f.write_text("".join(line + "\n" for line in keep))
    for npz in Path(folder).glob("traces_*.npz"):
        if int(npz.stem.split("_")[1]) > last_step:
            npz.unlink()
