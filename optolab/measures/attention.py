"""Attention-pattern scores per head. All take patterns ``[batch, head, query_pos, key_pos]``
and return ``[head]``; none needs a tokenizer, only the task's position metadata.

- induction strength (Singh et al. 2024): at the query, attention on label tokens carrying the
  query's label minus attention on label tokens carrying other labels. Range [−1, 1].
- previous-token score: attention from i to i−1, averaged over positions i ≥ 1; and the
  baseline-corrected a − (1−a)/i (0 for uniform attention over the i+1 visible keys, 1 for a
  perfect previous-token head).
- prefix matching (Olsson et al. 2022): for each query in a repeat, attention summed over the
  keys that follow earlier occurrences of its token; averaged over such queries. Range [0, 1].
- lagged prefix matching: the same with every target key moved ``d`` positions later, for the
  lag ``d ∈ [0, max_lag]`` that maximises it (per head; the lag is reported too). On exact
  repeats a two-layer model can copy through a previous-token head that looks ``d + 1`` back
  (key side) and one that looks ``d`` back (value side): it then attends ``d`` past Olsson's
  target and its strict score stays near 0 although it copies perfectly. Lag 0 is Olsson's.
- most-recent prefix matching (stricter): the same with only the key after the query token's
  *most recent* earlier occurrence as the target (:func:`most_recent`). Olsson's score sums the
  attention over the keys after *every* earlier occurrence, so a head spreading its attention
  over all of them scores as high as one that picks the latest; this one does not.
- Baselines (a head with no role): a head attending uniformly over its causal prefix scores
  :func:`uniform_prefix_matching` (per query, the number of targets over the ``q + 1`` visible
  keys, averaged as the score is), not 0: about 1/L on Olsson's probe of L-token segments
  (0.074 all-occurrences / 0.043 most-recent at L = 10); 0.070 / 0.022 on the recurring-segments
  task's ``val`` split, where a query's token has occurred 4 times before on average (so a head
  spreading its attention evenly over the keys after all of them scores 1 on Olsson's score and
  about 0.25 on the most-recent one).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

Pattern = Float[Tensor, "batch head q_pos k_pos"]


def induction_strength(pattern: Pattern, match: Bool[Tensor, "batch pos"], nonmatch: Bool[Tensor, "batch pos"],
                       query_pos: int = -1) -> Float[Tensor, "head"]:
    row = pattern[:, :, query_pos, :]  # [batch, head, key]
    on_match = (row * match[:, None, :]).sum(-1)
    on_other = (row * nonmatch[:, None, :]).sum(-1)
    return (on_match - on_other).mean(0)


def previous_token(pattern: Pattern) -> tuple[Float[Tensor, "head"], Float[Tensor, "head"]]:
    """``(raw, baseline_corrected)``, each averaged over query positions 1..n−1 and the batch."""
    n = pattern.shape[-1]
    i = torch.arange(1, n, device=pattern.device)
    a = pattern[:, :, i, i - 1]  # [batch, head, n-1]
    corrected = a - (1 - a) / i.to(a.dtype)
    return a.mean((0, 2)), corrected.mean((0, 2))


def prefix_matching(pattern: Pattern, targets: Bool[Tensor, "batch_or_1 q_pos k_pos"]) -> Float[Tensor, "head"]:
    rows = targets.any(-1).expand(pattern.shape[0], -1)  # [batch, q]: queries with an earlier occurrence
    mass = (pattern * targets[:, None]).sum(-1)  # [batch, head, q]
    return (mass * rows[:, None]).sum((0, 2)) / rows.sum().clamp_min(1)


def lagged_prefix_matching(pattern: Pattern, targets: Bool[Tensor, "batch_or_1 q_pos k_pos"],
                           max_lag: int = 8) -> tuple[Float[Tensor, "head"], Float[Tensor, "head"]]:
    """``(score, lag)`` per head: prefix matching with target keys shifted by the best lag."""
    n = targets.shape[-1]
    scores = []
    for d in range(max_lag + 1):
        shifted = torch.zeros_like(targets)
        shifted[..., d:] = targets[..., : n - d]
        shifted &= torch.ones(n, n, dtype=torch.bool, device=targets.device).tril()  # stay causal
        scores.append(prefix_matching(pattern, shifted))
    table = torch.stack(scores)  # [lag, head]
    best, lag = table.max(0)
    return best, lag.to(best.dtype)


def most_recent(targets: Bool[Tensor, "batch_or_1 q_pos k_pos"]) -> Bool[Tensor, "batch_or_1 q_pos k_pos"]:
    """Only the last (largest-position) target key of each query: the key after the most recent
    earlier occurrence of its token."""
    n = targets.shape[-1]
    last = (targets * torch.arange(1, n + 1, device=targets.device)).argmax(-1, keepdim=True)
    out = torch.zeros_like(targets).scatter_(-1, last, True)
    return out & targets.any(-1, keepdim=True)


def uniform_prefix_matching(targets: Bool[Tensor, "batch_or_1 q_pos k_pos"]) -> float:
    """The prefix-matching score of a head with no role: uniform attention over the causal prefix
    (what :func:`prefix_matching` gives that pattern, without building it)."""
    n = targets.shape[-1]
    rows = targets.any(-1)
    share = targets.sum(-1) / torch.arange(1, n + 1, device=targets.device)  # targets over q + 1 keys
    return float((share * rows).sum() / rows.sum().clamp_min(1))
