"""The model's shape: a small frozen dataclass of the fields the model actually reads.

A protocol's ``model:`` section (see :mod:`optolab.protocol.schema`) chooses the architecture; the task
fills in what only it knows (input mode, context length, vocabulary or exemplar dimension, and
the output size). :func:`ModelConfig.validate` is where impossible shapes are refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from optolab.core.errors import OptolabError

InputMode = Literal["tokens", "exemplar_label"]
Positional = Literal["rope", "learned", "none"]


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_out: int  # vocabulary size (tokens) or number of labels (exemplar_label)
    input_mode: InputMode = "tokens"
    d_vocab: int = 0  # token ids in [0, d_vocab) (tokens mode)
    d_input: int = 0  # exemplar vector size (exemplar_label mode)
    n_labels: int = 0  # label ids in [0, n_labels) (exemplar_label mode)
    attn_only: bool = True
    d_mlp: int = 256
    layer_norm: bool = True  # pre-LN in every block; the final LN is separate
    final_ln: bool = True
    positional: Positional = "rope"
    rope_base: float = 10000.0
    smeared_keys: bool = False
    qkv_bias: bool = False
    unembed_bias: bool = True
    init_std: float | None = None  # None: 1/sqrt(fan_in) truncated normal (the authors' default)

    def validate(self) -> ModelConfig:
        if self.n_heads * self.d_head != self.d_model:
            raise OptolabError(
                f"n_heads × d_head = {self.n_heads} × {self.d_head} = {self.n_heads * self.d_head} "
                f"does not equal d_model = {self.d_model}.",
                field="model.d_head",
                fix=f"set d_head to d_model / n_heads (n_heads must divide d_model = {self.d_model}).",
            )
        if self.positional == "rope" and self.d_head % 2:
            raise OptolabError(
                f"RoPE rotates pairs of dimensions, so d_head must be even (got {self.d_head}).",
                field="model.positional", fix="use an even d_head or positional: learned.",
            )
        if self.input_mode == "tokens" and self.d_vocab < 1:
            raise OptolabError("token input needs a vocabulary size.", field="task", fix="use a token task.")
        if self.input_mode == "exemplar_label" and (self.d_input < 1 or self.n_labels < 1):
            raise OptolabError("exemplar input needs d_input and n_labels.", field="task",
                               fix="use an exemplar-label task.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
