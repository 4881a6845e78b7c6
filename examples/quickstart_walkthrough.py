# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # optolab walkthrough: from a training run to TransformerLens
#
# Run it top to bottom, as a script (`python examples/quickstart_walkthrough.py`) or as a
# notebook (`jupytext --to ipynb examples/quickstart_walkthrough.py`, then open it). It trains the
# quickstart (Singh et al. 2024's few-shot task, a 2-layer attention-only model; about a minute
# on one CPU core), then:
#
# 1. the loss curves;
# 2. every head's scores as one tidy table (step × layer × head × metric);
# 3. the attention patterns of the strongest induction head at the checkpoints around the drop;
# 4. an nnsight trace that ablates that head;
# 5. the model as a TransformerLens `HookedTransformer`, with a check that its logits are ours.
#
# `OPTOLAB_WALKTHROUGH_SEQUENCES` shortens training (the test suite runs it with a few thousand
# sequences, so nothing forms; the text describes the full run). Figures go to
# `OPTOLAB_WALKTHROUGH_OUT` (default `results/walkthrough`).

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: the script runs headless too
import matplotlib.pyplot as plt
import torch

import optolab
from optolab.model.export import tl_inputs
from optolab.protocol.loader import validate_protocol

torch.set_num_threads(1)  # the fastest for models this small
ROOT = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd()
SEQUENCES = float(os.environ.get("OPTOLAB_WALKTHROUGH_SEQUENCES", "2e5"))
OUT = Path(os.environ.get("OPTOLAB_WALKTHROUGH_OUT", ROOT / "results" / "walkthrough"))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Train the quickstart and plot its curves
#
# `load_protocol` validates the YAML; its resolved form is plain data, so a shorter budget is
# one field (evals and checkpoints scale with it).

# %%
data = optolab.load_protocol(ROOT / "protocols" / "quickstart.yaml").resolved()
data["train"]["sequences"] = SEQUENCES
evals = max(10, min(50, SEQUENCES // 4000))  # 50 on the full run; fewer on a short one
data["measures"]["schedule"] = {"unit": "sequences", "every": SEQUENCES / evals}
data["train"]["checkpoints"]["schedule"] = {"unit": "sequences", "every": SEQUENCES / 20}
run = optolab.run(validate_protocol(data), out=OUT / "run", overwrite=True, progress=False)

metrics = run.metrics
main = run.task.main_split
fig, ax = plt.subplots(figsize=(6, 3.5))
for split, rows in metrics[(metrics.metric == "loss") & metrics.layer.isna()].groupby("split"):
    ax.plot(rows.sequences, rows.value, label=split)
ax.set(xlabel="sequences", ylabel="loss", xscale="log")
ax.legend()
fig.savefig(OUT / "loss.png", dpi=100, bbox_inches="tight")
print(run.summary["phase_change"])  # the drop's onset, midpoint and end, in sequences (None if none)

# %% [markdown]
# ## 2. Per-head scores as one table
#
# `Run.head_scores` is the per-head part of the metrics table: one row per step, split, layer,
# head and metric. Pivot it however the question needs.

# %%
scores = run.head_scores(["induction_strength", "prev_token"], split=main)
print(scores.head())
last = scores[scores.step == scores.step.max()]
print(last.pivot_table(index=["metric", "layer"], columns="head", values="value").round(2))

# %% [markdown]
# ## 3. The strongest induction head, around the drop
#
# The head of the last layer with the highest final induction strength (attention from the
# query to label tokens carrying its label, minus other labels). Its pattern at the checkpoints
# nearest the drop's onset, midpoint and end (or spread over training when no drop was found)
# shows the head learning where to look.

# %%
induction = last[(last.metric == "induction_strength") & (last.layer == last.layer.max())]
best = induction.loc[induction.value.idxmax()]
layer, head = int(best.layer), int(best["head"])
print(f"strongest induction head: L{layer}H{head} ({best.value:.2f})")

batch = run.eval_batch(n=64)
drop = run.summary["phase_change"] or {}
wanted = [drop[k] / run.protocol.train.batch_size for k in ("onset", "midpoint", "end") if drop.get(k) is not None]
steps = run.checkpoint_steps
if len(wanted) < 3:
    wanted = [steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]]
around = sorted({min(steps, key=lambda s: abs(s - w)) for w in wanted})

fig, axes = plt.subplots(1, len(around), figsize=(3.2 * len(around), 3))
for ax, step in zip(list(axes) if len(around) > 1 else [axes], around):
    model = run.nnsight(step)
    with model.trace(*batch.inputs):
        pattern = model.blocks[layer].attn.hook_pattern.output.save()
    ax.imshow(pattern[:, head].mean(0).detach(), cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"L{layer}H{head}, step {step}", xlabel="key", ylabel="query")
fig.savefig(OUT / "induction_head_patterns.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# ## 4. An nnsight trace: ablate the head
#
# `run.nnsight()` is the plain trained model (no clamps) in `nnsight.NNsight`; every hook point
# is a module named as in TransformerLens. Zeroing the head's `hook_z` removes its output; the
# loss at the query says how much the model relies on it.

# %%
import torch.nn.functional as F  # noqa: E402

model = run.nnsight()
with model.trace(*batch.inputs):
    z = model.blocks[layer].attn.hook_z.output.clone()
    z[:, :, head] = 0.0
    model.blocks[layer].attn.hook_z.output = z
    ablated = model.output.save()
with torch.no_grad():
    clean = run.model()(*batch.inputs)
query = batch.targets[:, -1]
loss_clean = F.cross_entropy(clean[:, -1], query).item()
loss_ablated = F.cross_entropy(ablated[:, -1].detach(), query).item()
print(f"query loss: {loss_clean:.3f} clean, {loss_ablated:.3f} with L{layer}H{head} ablated")

# %% [markdown]
# ## 5. The same model in TransformerLens
#
# `Run.to_transformer_lens(step)` gives a `HookedTransformer` with the checkpoint's weights
# (needs `optolab[tl]`). The quickstart's inputs are exemplar vectors, not token ids, so they
# enter through the residual stream: `tl_inputs` computes optolab's embedding and asks
# TransformerLens to start at block 0. Everything TransformerLens offers then applies:
# `run_with_cache`, activation patching, its hook names (the same as optolab's).

# %%
tl = run.to_transformer_lens()
args, kwargs = tl_inputs(run.model(), *batch.inputs)
logits, cache = tl.run_with_cache(*args, **kwargs)
print(f"largest logit difference to optolab: {(logits - clean).abs().max().item():.1e}")
print(cache[f"blocks.{layer}.attn.hook_pattern"].shape)  # [batch, head, query, key]
