"""``optolab tasks show``: a task in plain text — decoded sequences and split statistics.

Rules:
- Everything shown comes from the public task interface (batches, ``Batch.extra``, ``model_io``,
  ``reference_losses``, ``holdouts``), so a user's own generator is shown the same way.
- Token sequences print as ids, with ``·`` after a position whose next token is scored; long
  ones are cut at ``max_tokens``. Exemplar-label sequences print as ``c<class>:l<label>`` pairs
  and the query's class → its target label (``c?`` when the task records no classes).
"""

from __future__ import annotations

import math

import torch

from optolab.tasks.base import IGNORE, Batch, Task


def decode(task: Task, batch: Batch, i: int, max_tokens: int = 48) -> str:
    io = task.model_io()
    targets = batch.targets[i]
    if io.input_mode == "tokens":
        tok = batch.inputs[0][i].tolist()
        parts = [f"{t}·" if targets[p] != IGNORE else str(t) for p, t in enumerate(tok[:max_tokens])]
        more = f" … (+{len(tok) - max_tokens})" if len(tok) > max_tokens else ""
        return " ".join(parts) + more
    labels = batch.inputs[1][i].tolist()
    classes = batch.extra.get("classes")
    cls = [f"c{c}" for c in classes[i].tolist()] if classes is not None else ["c?"] * (len(labels) + 1)
    pairs = " ".join(f"{c}:l{lab}" for c, lab in zip(cls, labels))
    return f"{pairs} | query {cls[len(labels)]} → l{int(targets[-1])}"


def split_stats(task: Task, batch: Batch) -> str:
    keep = batch.targets != IGNORE
    targets = batch.targets[keep]
    counts = torch.bincount(targets, minlength=1).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log()).sum())
    parts = [f"{batch.size} sequences", f"{keep.sum(1).double().mean():.1f} scored positions each",
             f"{len(p)} distinct targets (entropy {entropy:.2f} nats, majority {float(p.max()):.2f})"]
    classes = batch.extra.get("classes")
    if classes is not None:
        known = classes[classes >= 0]
        fresh = int((classes < 0).any(1).sum())
        if known.numel():
            parts.append(f"classes {int(known.min())}–{int(known.max())} ({known.unique().numel()} used)")
        if fresh:
            parts.append(f"{fresh} sequences of fresh classes")
    return "; ".join(parts)


def show_task(task: Task, *, n: int = 3, seed: int = 0, eval_sequences: int = 512) -> list[str]:
    spec = task.spec
    params = ", ".join(f"{k}={v}" for k, v in spec.model_dump().items()
                       if k not in ("kind", "generator") and v is not None)
    io = task.model_io()
    lines = [f"Task {spec.kind}: {params}", *task.describe()]
    shape = (f"tokens 0..{io.d_vocab - 1}" if io.input_mode == "tokens"
             else f"exemplars of {io.d_input} dims and {io.n_labels} labels")
    lines.append(f"Model input: {shape}; context {io.n_ctx} positions; {io.d_out} outputs.")
    refs = task.reference_losses()
    if refs:
        lines.append("Reference losses: " + "; ".join(f"{k} = {v:.3f}" for k, v in refs.items()))
    curves = task.reference_curves()
    if curves:
        n_ctx = io.n_ctx
        at = sorted({p for p in (0, 1, 2, 5, 10, 20, 50, n_ctx // 2, n_ctx - 2) if 0 <= p < n_ctx})
        lines.append("Reference loss by position: " + "; ".join(
            f"{name} " + " ".join(f"[{p}]{float(c[p]):.3f}" for p in at if not math.isnan(float(c[p])))
            for name, c in curves.items()))
    for h in task.holdouts():
        lines.append(f"Held out of training: {len(h.ids)} {h.what or h.field} (used by {', '.join(h.splits) or 'no split'}).")
    batch = task.train_batch(seed, 0, n)
    lines.append(f"Training batch (seed {seed}, step 0): {split_stats(task, batch)}")
    lines += [f"  {decode(task, batch, i)}" for i in range(min(n, batch.size))]
    for split in task.eval_splits:
        eb = task.eval_batch(split, seed, eval_sequences)
        tags = [t for t, on in (("main", split == task.main_split), ("in-context", split in task.icl_splits)) if on]
        lines.append(f"Split {split}{' (' + ', '.join(tags) + ')' if tags else ''}: {split_stats(task, eb)}")
        lines.append(f"  {decode(task, eb, 0)}")
    return lines
