"""Each compiled clamp in plain words, for ``optolab validate``."""

from __future__ import annotations

from optolab.clamps.compile import Compiled, Plan


def _heads(heads: tuple[int, ...] | None, n_heads: int) -> str:
    if heads is None:
        return f"all {n_heads} heads"
    return ("head " if len(heads) == 1 else "heads ") + ", ".join(map(str, heads))


def _where(c: Compiled, n_heads: int) -> str:
    site = c.site
    text = f"'{site.name}'"
    if site.head_axis is not None:
        text += f" ({_heads(c.heads, n_heads)})"
    if c.positions != "all":
        rows = "query rows" if site.is_pattern or site.is_scores else "positions"
        text += f" at {rows} {c.positions if isinstance(c.positions, str) else list(c.positions)}"
    return text


def _when(c: Compiled, plan: Plan, phase: bool = True) -> str:
    w, bs = c.when, plan.batch_size
    span = f"from step {w.start:,} to {w.stop:,} ({w.start * bs:,}–{w.stop * bs:,} sequences" + (
        ", the whole run)" if w.start == 0 and w.stop == plan.total_steps else ")")
    if not phase:
        return span
    words = {(True, True): "in training and evaluation", (True, False): "in training only",
             (False, True): "in evaluation only"}[(w.train, w.eval)]
    return f"{span}, {words}"


def describe_clamp(c: Compiled, plan: Plan, n_heads: int) -> str:
    s, kind = c.spec, c.kind
    label = f"Clamp {c.index}" + (f" ({s.name})" if s.name else "")
    if kind in ("perfect_copy", "layer_clamp", "freeze"):
        what = _special(c, n_heads)
    else:
        what = _site_words(c, n_heads)
    when = _when(c, plan, phase=kind != "freeze")  # a freeze acts on updates: no eval phase
    return f"{label}, {when}: {what}"


def _pattern_subject(c: Compiled, n_heads: int) -> str:
    layer = c.site.layer
    if c.heads is not None and len(c.heads) == 1:
        return f"head {c.heads[0]} of layer {layer}"
    return f"{_heads(c.heads, n_heads)} of layer {layer}"


def _site_words(c: Compiled, n_heads: int) -> str:
    s, kind = c.spec, c.kind
    where = _where(c, n_heads)
    one = c.heads is not None and len(c.heads) == 1
    attends = "attends" if one else "attend"
    puts = "puts" if one else "put"
    if kind == "ablate":
        return {"zero": f"{where} is set to zero (ablated).",
                "mean": f"{where} is replaced by its mean over the batch, per position (no gradient through it).",
                "resample": f"{where} is taken from another sequence of the same batch (no gradient through it)."}[s.how]
    if kind == "set":
        who = _pattern_subject(c, n_heads)
        if s.to == "previous_token":
            if s.strength == 1:
                return f"{who} {attends} only to the previous token (position 0 to itself)."
            return (f"{who} {attends} {s.strength:g} to the previous token and {1 - s.strength:g} to itself "
                    "(position 0 to itself).")
        if s.to == "perfect_match":
            return (f"at the query, {who} {puts} {s.strength:g} on the label token(s) carrying the query's label and "
                    f"{1 - s.strength:g} on the other label tokens, 0 elsewhere (an oracle; induction strength "
                    f"{2 * s.strength - 1:g}); other rows as computed.")
        if s.to == "uniform":
            return f"{who} {attends} uniformly to every position up to its own."
        if s.to == "constant":
            return f"{where} is set to {s.value:g}."
        return f"{where} is set to the tensor in {s.file}."
    if kind == "preserve":
        return (f"{where} is recorded in a clean pass (no clamps) and forced in the clamped pass; other clamps on "
                "the same entries win (pattern- or value-preserving ablations).")
    if kind == "graft":
        step = f" step {s.step}" if s.step is not None else " (last checkpoint)"
        return f"{where} is replaced by the frozen model's, from {s.source}{step}."
    if kind == "stop_gradient":
        return f"{where} is unchanged in the forward pass, but no gradient flows back through it."
    if kind == "scale":
        return f"{where} is multiplied by {s.factor:g}."
    if kind == "add":
        return f"{s.value:g} is added to {where}."
    raise AssertionError(kind)


def _special(c: Compiled, n_heads: int) -> str:
    s = c.spec
    if c.kind == "perfect_copy":
        return (f"the output at the query is head {s.head} of layer {s.layer}'s pre-softmax scores to the label tokens "
                "(other labels −1e9), so only that head's QK path and what feeds it learn (2 passes in the paper; "
                "1 here).")
    if c.kind == "layer_clamp":
        nxt = s.layer + 1
        text = (f"perfect previous-token input — the output of layer {s.layer} is replaced by the embeddings shifted "
                f"one position right (each label slot holds the exemplar before it; first and last keep their own), "
                f"and layer {nxt}'s patterns are recorded")
        if s.copy_head is not None:
            return text + (f"; the output at the query is head {s.copy_head} of layer {nxt}'s pre-softmax scores to the "
                           f"label tokens in that pass, so only the match step (subcircuit B) learns. Layers ≤ {s.layer} "
                           "get no gradient.")
        return text + (f"; then the output of layer {s.layer} is the embeddings themselves and layer {nxt}'s patterns "
                       f"are forced to the recorded ones (3 passes; 2 traces here). Layers ≤ {s.layer} get no gradient.")
    heads = "" if c.heads is None else f" ({_heads(c.heads, n_heads)})"
    fixed = f", after being set to the values in {s.source}" if s.source else ""
    return f"parameter {s.param}{heads} gets no update{fixed} (restored after every optimizer step)."
