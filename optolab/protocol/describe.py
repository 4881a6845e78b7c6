"""Plain-words descriptions of a protocol (``optolab validate``) and of a model's hook sites.

Rules: the description says what the run will do on this machine, not what its fields say:
``train.compile: auto`` is described as what it resolves to here (compiled or eager) and why
(:func:`compiling`; the run decides with :func:`~optolab.core.device.decide_compile`)."""

from __future__ import annotations

from optolab.clamps.describe import describe_clamp
from optolab.core.device import AUTO_COMPILE_STEPS, decide_compile, has_compiler, resolve_device
from optolab.core.errors import OptolabError
from optolab.measures.registry import active, at_checkpoints
from optolab.model.hooks import dry_run
from optolab.model.transformer import Transformer, build_model
from optolab.protocol.schema import Protocol, Schedule
from optolab.tasks import make_task


def _schedule(s: Schedule, batch_size: int, n_points: int) -> str:
    dense = "".join(f", every {d.every:,} until {d.until:,}" for d in s.dense)
    extra = f", and at {', '.join(f'{p:,}' for p in s.at)}" if s.at else ""
    return f"every {s.every:,} {s.unit}{dense}{extra} ({n_points} points including the start and the end)"


def describe_protocol(p: Protocol) -> list[str]:
    task = make_task(p.task)
    cfg = p.model_config_for(task)
    t, m = p.train, p.model
    io = task.model_io()
    n_params = sum(x.numel() for x in Transformer(cfg).parameters())
    kind = "attention-only" if m.attn_only else f"with MLPs (d_mlp {m.d_mlp})"
    lines = [
        f"Protocol '{p.name}'" + (f": {p.description}" if p.description else ""),
        f"Task: {p.task.kind} — " + ", ".join(f"{k}={v}" for k, v in p.task.model_dump().items()
                                              if k != "kind" and not (k == "generator" and v is None)),
        f"  eval splits: {', '.join(task.eval_splits)} (main: {task.main_split}); context {io.n_ctx} positions.",
        f"Model: {m.n_layers} layers × {m.n_heads} heads, d_model {m.d_model}, d_head {m.d_head}, {kind}, "
        f"{'pre-LayerNorm' if m.layer_norm else 'no block LayerNorm'}"
        f"{' + final LayerNorm' if m.final_ln else ''}, positions: {m.positional}"
        f"{', smeared keys' if m.smeared_keys else ''}; input {io.input_mode}, output {io.d_out}; {n_params:,} parameters.",
        f"Training: Adam lr {t.lr:g}, betas {t.betas}, weight decay {t.weight_decay:g}, "
        f"grad clip {t.grad_clip if t.grad_clip else 'none'}, batch {t.batch_size}, "
        f"{t.total_steps:,} steps = {t.total_steps * t.batch_size:,} sequences"
        + _compile_words(t),
        f"Seeds: init {p.seeds.init}, data {p.seeds.data}, eval {p.seeds.eval}."
        + ("" if p.init_from is None else
           f" The model starts from {p.init_from.run} ({'its last checkpoint' if p.init_from.step is None else f'its checkpoint at step {p.init_from.step}'}"
           f"{', with its Adam state' if p.init_from.optimizer else ', weights only'}), not from seeds.init."),
        *_data_lines(p),
        f"Evaluation: {_schedule(p.measures.schedule, t.batch_size, len(p.eval_steps()))}, "
        f"{p.measures.eval_sequences} sequences per split.",
        f"Checkpoints: {_schedule(t.checkpoints.schedule, t.batch_size, len(p.checkpoint_steps()))}"
        + (f", keeping the newest {t.checkpoints.keep}." if t.checkpoints.keep else "."),
    ]
    # the metric names too: the switch previous_token writes prev_token, which is what a reader looks for
    on = [m.NAME + (f" ({', '.join(m.METRICS)})" if m.METRICS and tuple(m.METRICS) != (m.NAME,) else "")
          for m in active(p.measures)]
    lines.append(f"Measures: {', '.join(on) or 'loss and accuracy only'} (where the task supports them).")
    for m, config in at_checkpoints(p.measures):
        every = "every checkpoint" if config.every == 1 else f"every {config.every}th checkpoint and the last"
        lines.append(f"At checkpoints: {m.NAME} ({every}; {m.DOC}).")
    if not p.clamps:
        lines.append("Clamps: none — every activation is left as the model computes it.")
        return lines
    plan = p.clamp_plan(task, cfg)
    everything = plan.clamps
    how = "the compiled path (train.compile)" if compiling(p.train)[0] else p.train.clamp_engine
    lines.append(f"Clamps ({len(everything)}, applied through {how}; "
                 "layers and heads count from 0):")
    lines += ["  " + describe_clamp(c, plan, cfg.n_heads) for c in everything]
    return lines


def compiling(t) -> tuple[bool, str]:
    """Whether a run with these ``train`` settings compiles when run alone here, and, for
    ``compile: auto``, why (in words)."""
    if t.compile != "auto":
        return bool(t.compile), ""
    try:
        device = resolve_device(t.device)
    except OptolabError:  # a device this machine lacks: the run refuses it, so say nothing of kernels
        device = None
    compiled = device is not None and decide_compile(t, device)
    ensemble = "; packed in an ensemble, on steps × members"
    if t.total_steps < AUTO_COMPILE_STEPS:
        why = (f"{t.total_steps:,} steps are fewer than the {AUTO_COMPILE_STEPS:,} a compile needs to repay "
               f"itself{ensemble}")
    elif device is None or not has_compiler(device):
        why = f"torch.compile cannot build kernels for {t.device} on this machine"
    else:
        why = f"{t.total_steps:,} steps, at least the {AUTO_COMPILE_STEPS:,} a compile needs to repay itself"
    return compiled, why


def _compile_words(t) -> str:
    compiled, why = compiling(t)
    if t.compile != "auto":
        return "; every forward through torch.compile (train.compile)." if compiled else "."
    if compiled:
        return f"; every forward through torch.compile (train.compile: auto: {why})."
    return f"; eager (train.compile: auto: {why})."


def site_shapes(p: Protocol, batch_size: int = 2) -> list[tuple[str, tuple[int, ...]]]:
    """Every hook name in forward order with its activation shape (dim 0 is the batch)."""
    task = make_task(p.task)
    model = build_model(p.model_config_for(task), 0)
    return list(dry_run(model, task.train_batch(0, 0, batch_size)).items())


def _data_lines(p) -> list[str]:
    """The data schedule in words: which task trains when (evals stay on ``task``)."""
    if p.data is None:
        return []
    from optolab.protocol.data_schedule import phases

    bs, total = p.train.batch_size, p.train.total_steps
    said = []
    for ph in phases(p.data, bs, total):
        named = ["the protocol's task" if k == "task" else f"the task in data.{k}" if k.startswith("phases.")
                 else f"'{k}'" for k in ph.keys]
        what = (named[0] if len(named) == 1 else
                "a mixture of " + ", ".join(f"{k} {w:.0%}" for k, w in zip(named, ph.weights)))
        said.append(f"steps {ph.start:,}-{ph.stop:,} ({ph.start * bs:,}-{ph.stop * bs:,} sequences): {what}")
    return ["Training data (data schedule): " + "; ".join(said) + "; elsewhere the task above. "
            "Evaluations use the task above throughout."]
