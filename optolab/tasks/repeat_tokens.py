"""Repeated random tokens (Olsson et al. 2022): ``BOS t1..tL t1..tL …`` (R copies), next-token loss.

Rules:
- Tokens are ids ``0..n_tokens−1`` drawn uniformly with replacement; ``BOS`` is id ``n_tokens``,
  so the model's vocabulary is ``n_tokens + 1``. Nothing depends on a tokenizer.
- The loss is next-token cross-entropy at every position but the last (``loss_on: all``), or
  only where the next token is a repeat, i.e. predictable in context (``loss_on: repeats``).
- ``induction_targets[q, k]`` marks, for a query ``q`` in copy 2.., every key ``k`` that follows
  an earlier occurrence of the same sequence position: ``k = q − m·L + 1``. Prefix matching on
  the task's own data is attention summed over those keys.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from optolab.tasks.base import IGNORE, Batch, ModelIO, Task, TaskSpec, rng


class RepeatTokensSpec(TaskSpec):
    kind: Literal["repeat_tokens"] = "repeat_tokens"
    n_tokens: int = Field(64, ge=2, description="ordinary token ids (BOS is one more)")
    seq_len: int = Field(10, ge=1, description="random tokens per copy (L)")
    n_repeats: int = Field(3, ge=2, description="copies of the random segment (R)")
    loss_on: Literal["all", "repeats"] = "all"
    task_seed: int = Field(0, description="unused by this task; kept for a uniform interface")


class RepeatTokensTask(Task):
    kind = "repeat_tokens"
    spec: RepeatTokensSpec

    @property
    def n_ctx(self) -> int:
        return 1 + self.spec.seq_len * self.spec.n_repeats

    @property
    def bos(self) -> int:
        return self.spec.n_tokens

    def model_io(self) -> ModelIO:
        return ModelIO(input_mode="tokens", n_ctx=self.n_ctx, d_out=self.spec.n_tokens + 1,
                       d_vocab=self.spec.n_tokens + 1)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("val",)

    def reference_losses(self) -> dict[str, float]:
        s = self.spec
        first = (s.seq_len - 1) if s.loss_on == "all" else 0
        n_targets = self.n_ctx - 1 if s.loss_on == "all" else s.seq_len * (s.n_repeats - 1)
        # a perfect in-context copier pays ln n_tokens only on the unpredictable first copy
        return {f"ln {s.n_tokens} (uniform)": math.log(s.n_tokens),
                "perfect copying": math.log(s.n_tokens) * (first + 1) / n_targets if s.loss_on == "all" else 0.0}

    def token_probe_vocab(self) -> tuple[int, int | None]:
        return self.spec.n_tokens, self.bos

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        return self._sample(rng(seed, 101, step), batch_size)

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        if split != "val":
            raise KeyError(f"unknown split {split!r}; repeat_tokens has ('val',)")
        return self._sample(rng(seed, 202, 0), n)

    def _sample(self, g: torch.Generator, b: int) -> Batch:
        s = self.spec
        segment = torch.randint(s.n_tokens, (b, s.seq_len), generator=g)
        tokens = torch.cat([torch.full((b, 1), self.bos), segment.repeat(1, s.n_repeats)], dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        if s.loss_on == "repeats":
            targets[:, : 1 + s.seq_len - 1] = IGNORE  # next token still in the first copy
        return Batch(inputs=(tokens,), targets=targets, tokens=tokens,
                     induction_targets=repeat_induction_targets(s.seq_len, s.n_repeats, prefix=1))


def repeat_induction_targets(seq_len: int, n_repeats: int, prefix: int) -> torch.Tensor:
    """``[pos, pos]`` mask: ``k`` is the token after an earlier copy of query ``q``'s position."""
    n = prefix + seq_len * n_repeats
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(prefix + seq_len, n):
        k = q - seq_len + 1
        while k >= prefix + 1:
            mask[q, k] = True
            k -= seq_len
    return mask
