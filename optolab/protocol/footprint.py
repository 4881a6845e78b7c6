"""A size guard: refuse a protocol whose memory need is absurd before anything is allocated.

Rules:
- The estimate is coarse on purpose (within a few x): the task's up-front allocations
  (``TaskSpec.static_bytes``), one training batch's activations and gradients, and the eval
  sets evaluated whole. It exists to catch typos (``batch_size: 320000``, an extra zero on
  ``n_train_classes``) in seconds instead of an out-of-memory kill after minutes.
- Above :data:`MAX_BYTES` the protocol is refused with one line naming the largest term's
  field. Below it nothing is said: a protocol that fits a big machine is the user's call.
"""

from __future__ import annotations

from optolab.core.errors import OptolabError

MAX_BYTES = 64 * 2**30


def activation_bytes(n_seq: int, n_ctx: int, d_model: int, n_layers: int, n_heads: int) -> int:
    """float32 activations of ``n_seq`` sequences: residual-stream tensors and attention maps."""
    per_layer = n_ctx * 12 * d_model + 3 * n_heads * n_ctx * n_ctx
    return 4 * n_seq * (n_layers * per_layer + 4 * n_ctx * d_model)


def check_footprint(protocol, n_ctx: int | None) -> None:
    """Raise if the estimate exceeds :data:`MAX_BYTES`. With ``n_ctx`` None (the task is not built
    yet) only the task's own allocations are checked."""
    m, t = protocol.model, protocol.train
    terms = {"task": protocol.task.static_bytes()}
    if n_ctx is not None:
        terms["train.batch_size"] = 2 * activation_bytes(t.batch_size, n_ctx, m.d_model, m.n_layers, m.n_heads)
        terms["measures.eval_sequences"] = activation_bytes(protocol.measures.eval_sequences, n_ctx, m.d_model,
                                                            m.n_layers, m.n_heads)
        probe = getattr(protocol.measures, "probe_sequences", 0)  # the prefix-matching probe, run whole
        terms["measures.probe_sequences"] = activation_bytes(probe, n_ctx, m.d_model, m.n_layers, m.n_heads)
    total = sum(terms.values())
    if total > MAX_BYTES:
        field, worst = max(terms.items(), key=lambda kv: kv[1])
        raise OptolabError(
            f"this protocol would need about {total / 2**30:,.0f} GiB of memory ({field}: {worst / 2**30:,.0f} GiB).",
            field=field, fix=f"check {field} for a typo; optolab refuses runs above {MAX_BYTES // 2**30} GiB.")
