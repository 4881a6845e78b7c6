"""``check_task``: does a generator keep the promises the trainer and the measures rely on?

Rules:
- The contract is the one :mod:`optolab.tasks.base` states. ``check_task`` draws training
  batches for a few seeds and steps and one batch of every eval split, and checks, in order:
  the declared splits; determinism per (seed, step) and variety across them; shapes, dtypes and
  id ranges against ``model_io()``; the position metadata (match masks, context labels,
  induction targets); that no held-out id (``holdouts()``) reaches a training batch and that
  held-out splits use only held-out ids; that every target of an ``icl_splits`` split can be
  read off its context; reference curves; and generation time.
- The first broken promise raises :class:`TaskContractError` (an ``OptolabError``: one line,
  naming the check, the split/seed/step and what to fix). Success returns a
  :class:`ContractReport` with the measured batch time.
- Everything is read through the public task interface; nothing is patched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optolab.core.errors import OptolabError
from optolab.tasks.base import IGNORE, Batch, Holdout, Task, TaskSpec


class TaskContractError(OptolabError):
    """A generator broke its contract."""


@dataclass
class ContractReport:
    kind: str
    checks: list[str] = field(default_factory=list)
    batch_ms: float = 0.0  # median time to generate one training batch

    def __str__(self) -> str:
        return f"{self.kind}: {len(self.checks)} checks passed; one batch in {self.batch_ms:.2f} ms"


def _fail(check: str, message: str, fix: str) -> TaskContractError:
    return TaskContractError(message, field=f"contract.{check}", fix=fix)


def as_task(task_or_spec: Any) -> Task:
    """A task from a Task, a TaskSpec, a spec mapping, or a path to a task YAML."""
    from optolab.tasks.registry import make_task, validate_task_spec

    if isinstance(task_or_spec, Task):
        return task_or_spec
    if isinstance(task_or_spec, (str, Path)):
        from optolab.protocol.loader import read_yaml

        data, lines = read_yaml(task_or_spec, "task spec")
        return make_task(validate_task_spec(data, field="", source=str(task_or_spec), lines=lines))
    if isinstance(task_or_spec, dict):
        return make_task(validate_task_spec(task_or_spec))
    if isinstance(task_or_spec, TaskSpec):
        return make_task(task_or_spec)
    raise TypeError(f"check_task takes a Task, a TaskSpec, a mapping or a path, not {type(task_or_spec).__name__}")


def check_task(task_or_spec: Any, *, seeds: tuple[int, ...] = (0, 1), steps: tuple[int, ...] = (0, 1, 97),
               batch_size: int = 16, eval_sequences: int = 32, max_batch_ms: float | None = 50.0,
               timing_batch_size: int = 32) -> ContractReport:
    """Check a generator's contract; raise :class:`TaskContractError` at the first broken promise.

    ``max_batch_ms`` bounds the median time of one training batch of ``timing_batch_size``
    (``None``: do not time)."""
    task = as_task(task_or_spec)
    report = ContractReport(kind=getattr(task, "kind", type(task).__name__))
    _check_splits(task)
    report.checks.append("splits")

    train = {(s, t): _call(task.train_batch, s, t, batch_size) for s in seeds for t in steps}
    evals = {split: _call(task.eval_batch, split, seeds[0], eval_sequences) for split in task.eval_splits}
    for where, batch in [*(((f"train_batch{k}"), b) for k, b in train.items()), *evals.items()]:
        if not isinstance(batch, Batch):
            raise _fail("shapes", f"{where} returned a {type(batch).__name__}, not a Batch.",
                        "return optolab.tasks.Batch(inputs=..., targets=...).")
    _check_determinism(task, train, evals, batch_size, eval_sequences)
    report.checks.append("determinism")

    for (s, t), batch in train.items():
        where = f"training batch (seed {s}, step {t})"
        _check_batch(task, batch, where, batch_size)
        _check_metadata(task, batch, where)
    for split, batch in evals.items():
        where = f"eval split '{split}'"
        _check_batch(task, batch, where, eval_sequences)
        _check_metadata(task, batch, where)
    report.checks += ["shapes", "metadata"]

    for h in task.holdouts():
        _check_holdout(h, train, evals)
    report.checks.append("holdouts")

    for split in task.icl_splits:
        _check_recoverable(task, evals[split], split)
    report.checks.append("icl_recoverable")

    _check_curves(task)
    report.checks.append("reference_curves")

    if max_batch_ms is not None:
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            task.train_batch(seeds[0], 10_000 + i, timing_batch_size)
            times.append((time.perf_counter() - t0) * 1e3)
        report.batch_ms = sorted(times)[2]
        if report.batch_ms > max_batch_ms:
            raise _fail("speed", f"one training batch of {timing_batch_size} takes {report.batch_ms:.1f} ms "
                        f"(budget {max_batch_ms} ms).",
                        "vectorise the sampler (no Python loop over sequences), or raise max_batch_ms.")
        report.checks.append("speed")
    return report


# --- the checks --------------------------------------------------------------------------


def _call(method: Any, *args: Any) -> Any:
    """Call a generator method; an exception in it is a broken contract, reported in one line."""
    try:
        return method(*args)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not re-raised
        call = f"{method.__name__}({', '.join(map(repr, args))})"
        raise _fail("calls", f"{call} raised {type(e).__name__}: {e}",
                    "fix the generator; call that method directly to see the traceback.") from None


def _check_splits(task: Task) -> None:
    splits = tuple(task.eval_splits)
    if not splits:
        raise _fail("splits", "eval_splits is empty.", "declare at least one eval split.")
    if len(set(splits)) != len(splits):
        raise _fail("splits", f"eval_splits has duplicates: {splits}.", "give each split one name.")
    if task.main_split not in splits:
        raise _fail("splits", f"main_split '{task.main_split}' is not an eval split {splits}.",
                    "return one of eval_splits from main_split.")
    for name in task.icl_splits:
        if name not in splits:
            raise _fail("splits", f"icl_splits names '{name}', which is not in eval_splits {splits}.",
                        "list only declared eval splits in icl_splits.")
    for h in task.holdouts():
        for name in h.splits:
            if name not in splits:
                raise _fail("splits", f"holdout '{h.field}' names split '{name}', not in eval_splits {splits}.",
                            "list only declared eval splits in Holdout.splits.")
        if h.per not in ("item", "row"):
            raise _fail("splits", f"holdout '{h.field}' has per={h.per!r}.", "use per='item' or per='row'.")


def _tensors(batch: Batch) -> dict[str, torch.Tensor]:
    out = {f"inputs[{i}]": x for i, x in enumerate(batch.inputs)}
    out["targets"] = batch.targets
    for name in ("match_mask", "nonmatch_mask", "context_labels", "tokens", "induction_targets"):
        value = getattr(batch, name)
        if value is not None:
            out[name] = value
    out.update({f"extra[{k!r}]": v for k, v in batch.extra.items() if isinstance(v, torch.Tensor)})
    return out


def _same(a: Batch, b: Batch) -> str | None:
    """The first field where two batches differ, or None."""
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        return f"fields {sorted(ta.keys() ^ tb.keys())}"
    for name in ta:
        if ta[name].shape != tb[name].shape or not torch.equal(ta[name], tb[name]):
            return name
    return None


def _check_determinism(task: Task, train: dict, evals: dict, batch_size: int, n_eval: int) -> None:
    fix = "draw every random number from a generator seeded by the arguments (optolab.tasks.rng(seed, stream, step))."
    for (s, t), batch in train.items():
        diff = _same(batch, task.train_batch(s, t, batch_size))
        if diff is not None:
            raise _fail("determinism", f"train_batch(seed={s}, step={t}) gave a different {diff} when called again.", fix)
    for split, batch in evals.items():
        diff = _same(batch, task.eval_batch(split, next(iter(train))[0], n_eval))
        if diff is not None:
            raise _fail("determinism", f"eval_batch('{split}') gave a different {diff} when called again.", fix)
    keys = list(train)
    by_step = [k for k in keys if k[0] == keys[0][0]]
    if len(by_step) > 1 and all(_same(train[by_step[0]], train[k]) is None for k in by_step[1:]):
        raise _fail("determinism", "train_batch returns the same batch at every step.",
                    "use the step in the generator's seed, e.g. rng(seed, 101, step).")
    seeds = sorted({k[0] for k in keys})
    if len(seeds) > 1 and _same(train[(seeds[0], keys[0][1])], train[(seeds[1], keys[0][1])]) is None:
        raise _fail("determinism", "train_batch returns the same batch for different seeds.",
                    "use the seed in the generator's seed, e.g. rng(seed, 101, step).")


def _check_batch(task: Task, batch: Batch, where: str, n: int) -> None:
    io = task.model_io()
    fix_io = "make the batch agree with model_io(), or model_io() with the batch."
    tg = batch.targets
    if tg.dtype != torch.long or tg.dim() != 2 or tg.shape[0] != n:
        raise _fail("shapes", f"{where}: targets must be int64 [batch={n}, pos], got {tg.dtype} {list(tg.shape)}.",
                    "build targets with dtype=torch.long, one row per sequence.")
    seq = tg.shape[1]
    if seq > io.n_ctx:
        raise _fail("shapes", f"{where}: sequences have {seq} positions but model_io().n_ctx is {io.n_ctx}.", fix_io)
    ok = (tg == IGNORE) | ((tg >= 0) & (tg < io.d_out))
    if not ok.all():
        bad = tg[~ok][:5].tolist()
        raise _fail("shapes", f"{where}: targets {bad} are outside [0, d_out={io.d_out}) and are not IGNORE (-100).",
                    fix_io)
    if not (tg != IGNORE).any():
        raise _fail("shapes", f"{where} has no target anywhere (every position is IGNORE).",
                    "set targets where the loss is taken.")
    if io.input_mode == "tokens":
        if len(batch.inputs) != 1:
            raise _fail("shapes", f"{where}: a token task's inputs are (tokens,), got {len(batch.inputs)} tensors.", fix_io)
        tok = batch.inputs[0]
        if tok.dtype != torch.long or tuple(tok.shape) != (n, seq):
            raise _fail("shapes", f"{where}: tokens must be int64 [{n}, {seq}], got {tok.dtype} {list(tok.shape)}.", fix_io)
        if tok.numel() and (tok.min() < 0 or tok.max() >= io.d_vocab):
            raise _fail("shapes", f"{where}: token ids span [{int(tok.min())}, {int(tok.max())}], outside "
                        f"[0, d_vocab={io.d_vocab}).", fix_io)
        if batch.tokens is not None and not torch.equal(batch.tokens, tok):
            raise _fail("metadata", f"{where}: Batch.tokens differs from inputs[0].", "set tokens=inputs[0].")
    else:
        if len(batch.inputs) != 2:
            raise _fail("shapes", f"{where}: an exemplar-label task's inputs are (exemplars, labels).", fix_io)
        x, lab = batch.inputs
        if x.dtype != torch.float32 or x.dim() != 3 or x.shape[0] != n or x.shape[2] != io.d_input:
            raise _fail("shapes", f"{where}: exemplars must be float32 [{n}, items, d_input={io.d_input}], "
                        f"got {x.dtype} {list(x.shape)}.", fix_io)
        if lab.dtype != torch.long or lab.dim() != 2 or lab.shape[0] != n or x.shape[1] - lab.shape[1] not in (0, 1):
            raise _fail("shapes", f"{where}: labels must be int64 [{n}, items or items-1], got {lab.dtype} "
                        f"{list(lab.shape)} with {x.shape[1]} items.", fix_io)
        if x.shape[1] + lab.shape[1] != seq:
            raise _fail("shapes", f"{where}: {x.shape[1]} items + {lab.shape[1]} labels != {seq} target positions.",
                        "give targets one column per input position.")
        if not torch.isfinite(x).all():
            raise _fail("shapes", f"{where}: exemplars contain NaN or Inf.", "check the generator's arithmetic.")
        if lab.numel() and (lab.min() < 0 or lab.max() >= io.n_labels):
            raise _fail("shapes", f"{where}: labels span [{int(lab.min())}, {int(lab.max())}], outside "
                        f"[0, n_labels={io.n_labels}).", fix_io)


def _check_metadata(task: Task, batch: Batch, where: str) -> None:
    io = task.model_io()
    seq = batch.targets.shape[1]
    if batch.match_mask is not None or batch.nonmatch_mask is not None:
        m, nm = batch.match_mask, batch.nonmatch_mask
        if m is None or nm is None or m.shape != batch.targets.shape or nm.shape != m.shape:
            raise _fail("metadata", f"{where}: match_mask and nonmatch_mask must both be bool [batch, {seq}].",
                        "set both masks or neither.")
        if (m & nm).any():
            raise _fail("metadata", f"{where}: a position is in both match_mask and nonmatch_mask.",
                        "a label token either carries the query's label or not.")
        if io.input_mode == "exemplar_label":
            labels = batch.inputs[1]
            label_pos = torch.zeros(seq, dtype=torch.bool)
            label_pos[1: 2 * labels.shape[1]: 2] = True
            if ((m | nm) & ~label_pos).any():
                raise _fail("metadata", f"{where}: match masks mark positions that are not label tokens.",
                            "mark only label positions (1, 3, 5, …).")
            query_label = batch.targets[:, -1]
            at = torch.zeros_like(batch.targets)
            at[:, label_pos] = labels
            wrong = m & (at != query_label[:, None])
            if wrong.any():
                row = int(wrong.any(1).nonzero()[0])
                raise _fail("metadata", f"{where}: sequence {row}: match_mask marks a label token whose label is not "
                            "the query's target.", "mark the label tokens that carry the query's label.")
    if batch.context_labels is not None and io.input_mode == "exemplar_label":
        labels = batch.inputs[1]
        present = torch.zeros(labels.shape[0], io.n_labels, dtype=torch.bool).scatter_(1, labels, True)
        if not torch.equal(present, batch.context_labels):
            raise _fail("metadata", f"{where}: context_labels does not match the labels in the context.",
                        "set context_labels[b, l] = label l appears in sequence b.")
    if batch.induction_targets is not None:
        it = batch.induction_targets
        if it.dtype != torch.bool or it.dim() != 3 or it.shape[1:] != (seq, seq):
            raise _fail("metadata", f"{where}: induction_targets must be bool [batch, {seq}, {seq}].",
                        "build it per (query, key).")
        if (it & ~torch.ones(seq, seq, dtype=torch.bool).tril()).any():
            raise _fail("metadata", f"{where}: induction_targets marks keys after the query.",
                        "a causal model can only attend to keys k <= q.")
        if batch.tokens is not None:
            tok = batch.tokens.expand(it.shape[0], -1) if batch.tokens.shape[0] == 1 else batch.tokens
            b_i, q_i, k_i = it.expand(tok.shape[0], -1, -1).nonzero(as_tuple=True)
            bad = (k_i < 1) | (tok[b_i, (k_i - 1).clamp_min(0)] != tok[b_i, q_i])
            if bad.any():
                raise _fail("metadata", f"{where}: induction_targets marks a key whose previous token is not the "
                            "query's token.", "mark key k for query q only when token k-1 equals token q.")


def _ids(batch: Batch, h: Holdout, where: str) -> set:
    if h.field not in batch.extra:
        raise _fail("holdouts", f"{where} has no Batch.extra['{h.field}'], which holdouts() declares.",
                    f"put the {h.field} of every sequence in Batch.extra['{h.field}'].")
    x = batch.extra[h.field]
    if h.per == "row":
        return {tuple(r) for r in x.tolist() if min(r, default=0) >= 0}
    return {v for v in x.flatten().tolist() if v >= 0}


def _check_holdout(h: Holdout, train: dict, evals: dict) -> None:
    what = h.what or f"held-out {h.field}"
    for (s, t), batch in train.items():
        leaked = _ids(batch, h, f"training batch (seed {s}, step {t})") & h.ids
        if leaked:
            shown = sorted(leaked)[:5]
            raise _fail("holdouts", f"training batch (seed {s}, step {t}) contains {what} {shown} "
                        f"(Batch.extra['{h.field}']).",
                        f"draw training {h.field} only outside the held-out set; held-out ids must never be trained on.")
    for split in h.splits:
        stray = _ids(evals[split], h, f"eval split '{split}'") - h.ids
        if stray:
            raise _fail("holdouts", f"eval split '{split}' should use only {what} but draws {sorted(stray)[:5]}.",
                        f"draw the '{split}' split's {h.field} from the held-out set only.")


def _check_recoverable(task: Task, batch: Batch, split: str) -> None:
    io = task.model_io()
    fix = "an ICL split needs the answer in the context; fix the sampler or drop the split from icl_splits."
    if io.input_mode == "exemplar_label":
        x, labels = batch.inputs
        n_lab = labels.shape[1]
        target = batch.targets[:, -1]
        if "classes" in batch.extra:
            cls = batch.extra["classes"]
            same = cls[:, :n_lab] == cls[:, -1:]
        elif batch.match_mask is not None:
            same = batch.match_mask[:, 1: 2 * n_lab: 2]
        else:
            raise _fail("icl_recoverable", f"split '{split}' has neither Batch.extra['classes'] nor a match_mask.",
                        "record each item's class in Batch.extra['classes'].")
        found = (same & (labels == target[:, None])).any(1)
    else:
        tok = batch.inputs[0]
        keep = batch.targets != IGNORE
        # target at q is recoverable if some k <= q has tokens[k-1] == tokens[q] and tokens[k] == target
        prev_match = torch.zeros(tok.shape[0], tok.shape[1], tok.shape[1], dtype=torch.bool)
        prev_match[:, :, 1:] = tok[:, :, None] == tok[:, None, :-1]
        prev_match &= torch.ones(tok.shape[1], tok.shape[1], dtype=torch.bool).tril()
        copies = prev_match & (tok[:, None, :] == batch.targets[:, :, None])
        found = (copies.any(-1) | ~keep).all(1)
    if not found.all():
        row = int((~found).nonzero()[0])
        raise _fail("icl_recoverable", f"split '{split}', sequence {row}: the target cannot be read off the context.",
                    fix)


def _check_curves(task: Task) -> None:
    n_ctx = task.model_io().n_ctx
    for name, curve in task.reference_curves().items():
        if curve.dim() != 1 or curve.shape[0] != n_ctx:
            raise _fail("reference_curves", f"curve '{name}' has shape {list(curve.shape)}, expected [{n_ctx}].",
                        "give one value per position (NaN where no loss is taken).")
        finite = curve[~curve.isnan()]
        if not finite.numel() or (finite < 0).any() or not torch.isfinite(finite).all():
            raise _fail("reference_curves", f"curve '{name}' must hold non-negative finite losses.",
                        "check the estimator.")
