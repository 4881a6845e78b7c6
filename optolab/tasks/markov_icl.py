"""In-context Markov chains (Edelman et al. 2024, "The evolution of statistical induction heads").

Rules:
- Every sequence has its own transition table: for each of the ``k^n`` contexts (the last
  ``order`` = n tokens) a row of next-token probabilities drawn from Dirichlet(``concentration``).
  The first n tokens come from the chain's stationary distribution (as in the authors' code).
  Nothing is shared between sequences, so only in-context statistics help.
- Next-token loss at every position whose next token exists and whose context is complete
  (positions ``n−1 … T−2``).
- Reference losses per position (:meth:`reference_curves`), estimated once on
  ``reference_sequences`` sequences from ``task_seed``: ``uniform`` (ln k), ``unigram`` (the
  in-context unigram estimator ``(c_j + 1)/(t + 1 + k)``) and ``bayes`` (the in-context n+1-gram
  estimator ``(c_{s,j} + α)/(c_s + kα)``, which is Bayes-optimal for Dirichlet(α) rows). Their
  means over positions are the task's :meth:`reference_losses`. A model's loss falls from the
  first to the second (the unigram plateau) and then towards the third.
- Eval split ``val`` carries ``induction_targets`` (keys that follow an earlier occurrence of the
  query's context), so prefix matching on task data is measured per head.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from optolab.core.errors import SpecError
from optolab.tasks.base import IGNORE, Batch, ModelIO, Task, TaskSpec, rng
from optolab.tasks.tokens import gamma, induction_targets_from_tokens, inverse_cdf, sample_chain


class MarkovICLSpec(TaskSpec):
    kind: Literal["markov_icl"] = "markov_icl"
    n_states: int = Field(3, ge=2, description="k: token ids 0..k-1")
    order: int = Field(1, ge=1, le=4, description="n: the next token depends on the last n")
    seq_len: int = Field(100, ge=3, description="tokens per sequence (the model's context)")
    concentration: float = Field(1.0, gt=0, description="α of the Dirichlet rows")
    reference_sequences: int = Field(2000, ge=10, description="sequences used to estimate the reference losses")

    def static_bytes(self) -> int:
        return 4 * self.reference_sequences * self.seq_len * self.n_states ** (self.order + 1)

    @model_validator(mode="after")
    def _consistent(self) -> MarkovICLSpec:
        if self.n_states**self.order > 4096:
            raise SpecError("order", f"n_states^order = {self.n_states}^{self.order} contexts is too many "
                            "(at most 4096).", "lower order or n_states.")
        if self.seq_len <= self.order + 1:
            raise SpecError("seq_len", f"seq_len ({self.seq_len}) must exceed order + 1 ({self.order + 1}) so "
                            "some position has a full context and a next token.", f"use seq_len >= {self.order + 2}.")
        return self


class MarkovICLTask(Task):
    """In-context Markov chains (Edelman et al. 2024): per-sequence transition table, next-token loss."""

    kind = "markov_icl"
    Spec = MarkovICLSpec
    spec: MarkovICLSpec

    @classmethod
    def spec_strategy(cls) -> Any:
        """Small, always-valid specs for the contract tests (a hypothesis strategy)."""
        from hypothesis import strategies as st

        task_seeds = st.integers(0, 2**31 - 1)

        @st.composite
        def draw_spec(draw: Any) -> MarkovICLSpec:
            order = draw(st.integers(1, 2))
            return MarkovICLSpec(n_states=draw(st.integers(2, 5)), order=order, seq_len=draw(st.integers(order + 2, 40)),
                                 concentration=draw(st.sampled_from([0.3, 1.0, 2.5])), reference_sequences=50,
                                 task_seed=draw(task_seeds))

        return draw_spec()

    @property
    def n_contexts(self) -> int:
        return self.spec.n_states**self.spec.order

    def model_io(self) -> ModelIO:
        s = self.spec
        return ModelIO(input_mode="tokens", n_ctx=s.seq_len, d_out=s.n_states, d_vocab=s.n_states)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("val",)

    @cached_property
    def _references(self) -> dict[str, torch.Tensor]:
        s = self.spec
        batch = self._sample(rng(s.task_seed, 303), s.reference_sequences)
        return reference_curves(batch.tokens, s.n_states, s.order, s.concentration)

    def reference_curves(self) -> dict[str, torch.Tensor]:
        return dict(self._references)

    def reference_losses(self) -> dict[str, float]:
        names = {"uniform": f"ln {self.spec.n_states} (uniform)", "unigram": "in-context unigram",
                 "bayes": f"in-context {self.spec.order + 1}-gram (Bayes)"}
        return {names[k]: float(v.nanmean()) for k, v in self._references.items()}

    # --- batches ------------------------------------------------------------------------

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        return self._sample(rng(seed, 101, step), batch_size)

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        batch = self._sample(rng(seed, 202, 0), n)
        query = batch.targets != IGNORE
        batch.induction_targets = induction_targets_from_tokens(batch.tokens, query, self.spec.order)
        return batch

    def _sample(self, g: torch.Generator, b: int) -> Batch:
        s = self.spec
        k, n, S, T = s.n_states, s.order, self.n_contexts, s.seq_len
        alpha = torch.full((b, S, k), float(s.concentration))
        # Dirichlet rows as normalised Gamma(α) draws; Gamma(1) is Exp(1) = -log U
        rows = -torch.rand(b, S, k, generator=g).log() if s.concentration == 1 else gamma(alpha, g)
        P = rows / rows.sum(-1, keepdim=True)  # [b, S, k]
        # the context chain on S states: from context s, token j leads to context (s·k + j) mod S
        cdf = P.cumsum(-1)
        u = torch.rand(b, T - n, generator=g)
        next_tok = inverse_cdf(cdf[:, None, :, :], u[:, :, None])  # [b, T-n, S]
        start = inverse_cdf(stationary(P, k, n).cumsum(-1), torch.rand(b, generator=g))  # a context id
        first_tokens = _digits(start, k, n)  # [b, n]
        state_next = lambda state, tok: (state * k + tok) % S  # noqa: E731
        walk = sample_chain(start, next_tok, state_of=state_next)  # [b, T-n+1]: start context, then tokens
        tokens = torch.cat([first_tokens, walk[:, 1:]], dim=1)
        targets = torch.full((b, T), IGNORE, dtype=torch.long)
        targets[:, n - 1: T - 1] = tokens[:, n:]
        return Batch(inputs=(tokens,), targets=targets, tokens=tokens, extra={"transitions": P})


def _digits(ctx: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Context ids → their n tokens, oldest first."""
    return torch.stack([(ctx // k ** (n - 1 - i)) % k for i in range(n)], dim=1)


def stationary(P: torch.Tensor, k: int, n: int, squarings: int = 10) -> torch.Tensor:
    """Stationary distribution ``[b, S]`` over contexts of the chain with rows ``P [b, S, k]``."""
    b, S, _ = P.shape
    # transition over contexts: s → (s·k + j) mod S with probability P[s, j]
    dest = (torch.arange(S)[:, None] * k + torch.arange(k)[None, :]) % S  # [S, k]
    M = torch.zeros(b, S, S, dtype=torch.float64)
    M.scatter_add_(2, dest.expand(b, S, k), P.double())
    for _ in range(squarings):  # M^(2^10): rows are Dirichlet, so the chain is aperiodic
        M = M @ M
    pi = torch.full((b, 1, S), 1.0 / S, dtype=torch.float64) @ M
    return (pi.squeeze(1) / pi.sum(-1)).float()


def reference_curves(tokens: torch.Tensor, k: int, n: int, alpha: float) -> dict[str, torch.Tensor]:
    """Per-position losses ``[T]`` of the uniform, in-context unigram and in-context Bayes
    (n+1-gram, Dirichlet(α)) predictors of the next token; NaN where no loss is taken."""
    b, T = tokens.shape
    S = k**n
    onehot = torch.nn.functional.one_hot(tokens, k).double()  # [b, T, k]
    nxt = tokens[:, 1:]  # the target at position t is tokens[t+1]
    # unigram: counts of tokens 0..t
    counts = onehot.cumsum(1)[:, :-1]  # [b, T-1, k]
    p_uni = (counts.gather(2, nxt[..., None]).squeeze(-1) + 1) / (torch.arange(1, T).double() + k)
    # n+1-gram: context at t is tokens[t-n+1..t]; transitions (ctx at s, tokens[s+1]) for s < t
    ctx = torch.zeros(b, T, dtype=torch.long)
    for i in range(n):
        shifted = torch.zeros(b, T, dtype=torch.long)
        shifted[:, i:] = tokens[:, : T - i]
        ctx = ctx + shifted * k**i
    trans = torch.nn.functional.one_hot(ctx[:, :-1] * k + nxt, S * k).double()  # [b, T-1, S·k]
    seen = torch.cat([torch.zeros(b, 1, S * k, dtype=torch.float64), trans.cumsum(1)[:, :-1]], dim=1)
    c_sj = seen.gather(2, (ctx[:, :-1] * k + nxt)[..., None]).squeeze(-1)
    c_s = seen.view(b, T - 1, S, k).sum(-1).gather(2, ctx[:, :-1, None]).squeeze(-1)
    p_bayes = (c_sj + alpha) / (c_s + k * alpha)
    out = {"uniform": torch.full((T - 1,), math.log(k)), "unigram": -p_uni.log().mean(0),
           "bayes": -p_bayes.log().mean(0)}
    nan_row = torch.full((1,), float("nan"))
    return {name: torch.cat([torch.where(torch.arange(T - 1) >= n - 1, v.float(), float("nan")), nan_row])
            for name, v in out.items()}
