"""Token-sequence tasks: their shared base, sampling Markov chains fast, and induction metadata.

Rules:
- :class:`NextTokenTask` is the base of tasks over ids ``0..n_tokens−1`` with no BOS, whose spec
  has ``n_tokens`` and ``seq_len`` (the model's context) and whose loss is on the next token
  (:func:`next_token_targets`; a task may then keep only some positions).
- :func:`sample_chain` draws every sequence's next token for every possible state up front
  (one uniform per sequence and position, shared by all states, so each used draw is still an
  exact sample) and then walks the chain with one gather per position. Walking a chain is
  sequential; this keeps the per-position work to one indexing op.
- :func:`gamma` draws Gamma(α, 1) from a seeded generator (torch's own sampler takes none),
  for Dirichlet rows.
- :func:`induction_targets_from_tokens` marks, for each query ``q`` in ``query_mask``, every key
  ``k ≤ q`` whose previous token equals token ``q``: the keys an induction head attends to.
  :func:`induction_targets` gives them for a segment repeated after a prefix (the repeat task
  and Olsson's repeated-random-tokens probe, :mod:`optolab.measures.probes`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from optolab.tasks.base import IGNORE, ModelIO, Task


class NextTokenTask(Task):
    """A task over token ids ``0..n_tokens−1`` (no BOS) with next-token loss; its spec has
    ``n_tokens`` and ``seq_len``."""

    def model_io(self) -> ModelIO:
        s = self.spec
        return ModelIO(input_mode="tokens", n_ctx=s.seq_len, d_out=s.n_tokens, d_vocab=s.n_tokens)

    def token_probe_vocab(self) -> tuple[int, None]:
        return self.spec.n_tokens, None


def next_token_targets(tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Each position's target is the next token; the last position, which has none, is ``IGNORE``."""
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = tokens[:, 1:]
    return targets


def sample_chain(first: Int[Tensor, "batch"], next_table: Int[Tensor, "batch pos state"],
                 state_of: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> Int[Tensor, "batch pos"]:
    """Tokens ``[b, T]`` with ``x_0 = first`` and ``x_{t+1} = next_table[b, t, s_t]``, where the
    state ``s_t`` is ``x_t`` (or ``state_of(s_{t-1}, x_t)`` for higher-order chains)."""
    table = next_table.numpy()
    b, T, _ = table.shape
    rows = np.arange(b)
    tokens = np.empty((b, T + 1), dtype=np.int64)
    tokens[:, 0] = first.numpy()
    state = tokens[:, 0]
    for t in range(T):
        tokens[:, t + 1] = table[rows, t, state]
        state = tokens[:, t + 1] if state_of is None else state_of(state, tokens[:, t + 1])
    return torch.from_numpy(tokens)


def inverse_cdf(cdf: Float[Tensor, "... k"], u: Float[Tensor, "..."]) -> Int[Tensor, "..."]:
    """Index of the category that ``u ∈ [0, 1)`` falls in, for cumulative probabilities ``cdf``."""
    return (cdf < u[..., None]).sum(-1).clamp_max(cdf.shape[-1] - 1)


def induction_targets_from_tokens(tokens: Int[Tensor, "batch pos"], query_mask: Bool[Tensor, "batch pos"],
                                  order: int = 1) -> Bool[Tensor, "batch pos pos"]:
    """``[b, q, k]``: the ``order`` tokens before key ``k`` equal the ``order`` tokens ending at
    query ``q`` (and ``k ≤ q``), for queries in ``query_mask``."""
    b, n = tokens.shape
    same = torch.ones(b, n, n, dtype=torch.bool)
    for j in range(order):  # compare tokens[q - j] with tokens[k - 1 - j]
        q_tok = torch.full((b, n), -1, dtype=tokens.dtype)
        q_tok[:, j:] = tokens[:, : n - j]
        k_tok = torch.full((b, n), -2, dtype=tokens.dtype)
        k_tok[:, 1 + j:] = tokens[:, : n - 1 - j]
        same &= q_tok[:, :, None] == k_tok[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return same & causal & query_mask[:, :, None]


def gamma(alpha: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gamma(α, 1) draws from a seeded generator (Marsaglia–Tsang, vectorised with rejection)."""
    shape = alpha.shape
    a = alpha.flatten().double()
    boost = a < 1  # Gamma(a) = Gamma(a + 1) · U^(1/a)
    d = (a + boost.double()) - 1 / 3
    c = 1 / torch.sqrt(9 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while todo.any():
        idx = todo.nonzero().squeeze(1)
        x = torch.randn(len(idx), generator=g, dtype=torch.float64)
        v = (1 + c[idx] * x) ** 3
        u = torch.rand(len(idx), generator=g, dtype=torch.float64)
        ok = (v > 0) & (torch.log(u) < 0.5 * x**2 + d[idx] - d[idx] * v + d[idx] * torch.log(v.clamp_min(1e-300)))
        out[idx[ok]] = d[idx[ok]] * v[ok]
        todo[idx[ok]] = False
    u = torch.rand(len(a), generator=g, dtype=torch.float64)
    out = torch.where(boost, out * u ** (1 / a), out)
    return out.float().view(shape)


def sample_distinct(probs: Float[Tensor, "n"], b: int, k: int, g: torch.Generator) -> Int[Tensor, "batch k"]:
    """``k`` distinct ids per row with probability ∝ ``probs`` (sequential draws without
    replacement), by the Gumbel-top-k trick: one uniform per id and a top-k."""
    u = torch.rand(b, probs.shape[0], generator=g).clamp_min(1e-30)
    return (probs.log() - (-u.log()).log()).topk(k, dim=1).indices


def sample_iid(probs: Float[Tensor, "n"], shape: tuple[int, ...], g: torch.Generator) -> Int[Tensor, "..."]:
    """I.i.d. ids with probability ∝ ``probs`` (inverse CDF)."""
    cdf = probs.double().cumsum(0)
    cdf = cdf / cdf[-1]
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    return torch.searchsorted(cdf, u).clamp_max(probs.shape[0] - 1)


def iid_excluding(probs: Float[Tensor, "n"], draws: Int[Tensor, "batch m"], exclude: Int[Tensor, "batch"],
                  g: torch.Generator) -> Int[Tensor, "batch m"]:
    """``draws`` with every entry equal to its row's ``exclude`` redrawn until it differs: i.i.d.
    draws from ``probs`` conditioned on not being ``exclude``."""
    bad = draws == exclude[:, None]
    for _ in range(10_000):
        if not bad.any():
            return draws
        fresh = sample_iid(probs, (int(bad.sum()),), g)
        draws = draws.clone()
        draws[bad] = fresh
        bad = draws == exclude[:, None]
    raise RuntimeError("could not draw ids apart from the excluded one; its probability is ~1")


def induction_targets(L: torch.Tensor, n_repeats: int, n_ctx: int, prefix: int) -> torch.Tensor:
    """``[b, q, k]``: key ``k`` is the token after an earlier copy of query ``q``'s segment
    position, for segments of length ``L[b]`` repeated ``n_repeats`` times after ``prefix``."""
    q = torch.arange(n_ctx, device=L.device)[None, :, None] - prefix  # segment coordinates
    k = torch.arange(n_ctx, device=L.device)[None, None, :] - prefix
    L = L.reshape(-1, 1, 1)
    gap = q - k + 1  # = m·L for the m-th earlier copy
    return (q >= L) & (q < L * n_repeats) & (k >= 1) & (gap >= L) & (gap % L == 0)


def repeat_induction_targets(seq_len: int, n_repeats: int, prefix: int) -> torch.Tensor:
    """``[1, pos, pos]`` induction targets of a fixed-length repeat (see :func:`induction_targets`)."""
    return induction_targets(torch.tensor([seq_len]), n_repeats, prefix + seq_len * n_repeats, prefix)
