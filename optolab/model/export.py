"""A model as a TransformerLens ``HookedTransformer``, with the same logits.

Rules:
- :func:`to_hooked_transformer` builds a ``HookedTransformer`` (TransformerLens 3.x, the extra
  ``optolab[tl]``; 4.0 removed the class) whose config says what optolab's does and copies every
  weight, so its logits on the same token ids equal optolab's up to float rounding (tested to
  1e-5 over every option that maps). It is the model as trained, without clamps: a clamp is a
  protocol's intervention, not part of the weights.
- What maps: positional ``rope`` (TransformerLens' rotary with adjacent pairs, GPT-J style; its
  sine and cosine tables are replaced by optolab's, computed in float64), ``learned``
  (``standard``) and ``none`` (``standard`` with a zero ``W_pos``); LayerNorm in every block and
  before the unembedding, or none at all; attention-only or with GELU MLPs; attention biases
  and the unembedding bias (zeros where optolab has none).
- Exemplar-label models enter through TransformerLens' residual stream: optolab computes the
  embedding (exemplar map, label embedding, learned positions) and the ``HookedTransformer``
  runs from block 0 (``start_at_layer=0``); its token embedding is a placeholder (one zero row).
  :func:`tl_inputs` gives the arguments for either kind of model.
- What does not map is refused in one line naming it (:func:`why_not`): smeared keys, and a final
  LayerNorm without the blocks' (or the blocks' without a final one): TransformerLens has one
  ``normalization_type`` for all.
- :func:`save` writes the weights as safetensors and the config as JSON (nothing unpickles), an
  exemplar model's embedding beside them (``optolab_embed.*``); :func:`load` builds the
  ``HookedTransformer`` again. TransformerLens is imported only here, when
  called, so ``import optolab`` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from optolab.core.errors import OptolabError
from optolab.model import kernels
from optolab.model.config import ModelConfig
from optolab.model.transformer import Transformer

FIX = "export a token model without it, or analyse this one with optolab's own nnsight wrapper (Run.nnsight)."


def why_not(cfg: ModelConfig) -> str | None:
    """What about this model TransformerLens cannot express, or None when it maps."""
    if cfg.smeared_keys:
        return "model.smeared_keys (TransformerLens' attention has no key smearing)"
    if cfg.layer_norm != cfg.final_ln:
        return (f"model.layer_norm: {str(cfg.layer_norm).lower()} with model.final_ln: {str(cfg.final_ln).lower()} "
                "(TransformerLens normalises every block and the unembedding alike)")
    return None


def tl_config(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ``HookedTransformerConfig`` for a model of ``cfg``."""
    reason = why_not(cfg)
    if reason is not None:
        raise OptolabError(f"this model does not map to TransformerLens: {reason}.", field="model", fix=FIX)
    out = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, n_heads=cfg.n_heads,
               d_vocab=cfg.d_vocab if cfg.input_mode == "tokens" else 1, d_vocab_out=cfg.d_out, attn_only=cfg.attn_only,
               normalization_type="LN" if cfg.layer_norm else None, eps=1e-5,
               positional_embedding_type="rotary" if cfg.positional == "rope" else "standard",
               init_weights=False, device="cpu", default_prepend_bos=False)
    if not cfg.attn_only:
        out.update(d_mlp=cfg.d_mlp, act_fn="gelu")  # exact GELU, as optolab's F.gelu
    if cfg.positional == "rope":
        out.update(rotary_dim=cfg.d_head, rotary_base=cfg.rope_base, rotary_adjacent_pairs=True)
    return out


@torch.no_grad()
def tl_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """optolab's weights under TransformerLens' names and layouts."""
    cfg = model.cfg
    zeros = torch.zeros
    tokens = cfg.input_mode == "tokens"
    sd = {"embed.W_E": model.W_E if tokens else zeros(1, cfg.d_model), "unembed.W_U": model.W_U,
          "unembed.b_U": model.b_U if cfg.unembed_bias else zeros(cfg.d_out)}
    if cfg.positional != "rope":
        sd["pos_embed.W_pos"] = model.W_pos if cfg.positional == "learned" else zeros(cfg.n_ctx, cfg.d_model)
    if cfg.final_ln:
        sd["ln_final.w"], sd["ln_final.b"] = model.ln_final.w, model.ln_final.b
    for i, block in enumerate(model.blocks):
        a, p = block.attn, f"blocks.{i}."
        for name in "QKV":  # optolab [d_model, head, d_head] -> TransformerLens [head, d_model, d_head]
            sd[f"{p}attn.W_{name}"] = getattr(a, f"W_{name}").permute(1, 0, 2)
            sd[f"{p}attn.b_{name}"] = getattr(a, f"b_{name}") if cfg.qkv_bias else zeros(cfg.n_heads, cfg.d_head)
        sd[f"{p}attn.W_O"] = a.W_O
        sd[f"{p}attn.b_O"] = a.b_O if cfg.qkv_bias else zeros(cfg.d_model)
        if cfg.layer_norm:
            sd[f"{p}ln1.w"], sd[f"{p}ln1.b"] = block.ln1.w, block.ln1.b
        if not cfg.attn_only:
            if cfg.layer_norm:
                sd[f"{p}ln2.w"], sd[f"{p}ln2.b"] = block.ln2.w, block.ln2.b
            for name in ("W_in", "b_in", "W_out", "b_out"):
                sd[f"{p}mlp.{name}"] = getattr(block.mlp, name)
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}


def tl_inputs(model: Transformer, *inputs: torch.Tensor) -> tuple[tuple[torch.Tensor], dict[str, Any]]:
    """``(args, kwargs)`` with which the exported model computes what ``model(*inputs)`` does:
    the token ids, or for an exemplar-label model optolab's embedding (positions added) and
    ``start_at_layer=0``."""
    if model.cfg.input_mode == "tokens":
        return (inputs[0],), {}
    with torch.no_grad():
        resid = model.embed(*inputs)
        if model.cfg.positional == "learned":
            resid = resid + model.W_pos[: resid.shape[1]]
    return (resid,), {"start_at_layer": 0}


def _hooked(config: dict[str, Any], state: dict[str, torch.Tensor], rope_base: float | None):
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as e:
        raise OptolabError(f"TransformerLens 3.x is not installed ({e}).", field="transformer_lens",
                           fix="pip install 'optolab[tl]' (TransformerLens >= 3, < 4).") from None
    tl = HookedTransformer(HookedTransformerConfig(**config))
    params = dict(tl.named_parameters())
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:  # a TransformerLens release that names its weights otherwise
        raise OptolabError(f"TransformerLens' weights do not match optolab's (missing {missing}, unexpected {extra}).",
                           field="transformer_lens", fix="install the TransformerLens release optolab[tl] pins.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
        if rope_base is not None:  # optolab's rotations, computed in float64, not TransformerLens' float32 ones
            table = kernels.rotary_table(config["n_ctx"], config["d_head"], rope_base)
            for block in tl.blocks:
                block.attn.rotary_cos.copy_(table.real.repeat_interleave(2, dim=-1))
                block.attn.rotary_sin.copy_(table.imag.repeat_interleave(2, dim=-1))
    return tl.eval()


def to_hooked_transformer(model: Transformer):
    """``model`` as a TransformerLens ``HookedTransformer`` on the CPU (see the module rules)."""
    cfg = model.cfg
    return _hooked(tl_config(cfg), tl_state_dict(model), cfg.rope_base if cfg.positional == "rope" else None)


def save(model: Transformer, path: str | Path) -> Path:
    """Write ``path`` (``.safetensors``, TransformerLens' names) and ``path`` + ``.json`` (its config)."""
    from safetensors.torch import save_file

    cfg = model.cfg
    config = tl_config(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if cfg.input_mode == "tokens" else {
        f"optolab_embed.{k}": getattr(model, k).detach().cpu().contiguous() for k in ("W_X", "b_X", "W_L")}
    save_file({**tl_state_dict(model), **extra}, str(path))
    meta = {"config": config, "rope_base": cfg.rope_base if cfg.positional == "rope" else None}
    Path(f"{path}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load(path: str | Path):
    """The ``HookedTransformer`` :func:`save` wrote to ``path``."""
    from safetensors.torch import load_file

    meta = json.loads(Path(f"{path}.json").read_text())
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("optolab_embed.")}
    return _hooked(meta["config"], state, meta["rope_base"])
