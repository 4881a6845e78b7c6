"""A checkpoint as a TransformerLens HookedTransformer: the same logits (<= 1e-5) for every model
option that maps, TransformerLens' caches under the same names, what does not map refused in one
line, and `optolab export` writing a file that loads back to the same model."""

from __future__ import annotations

import itertools

import pytest
import torch

from optolab.api import run as run_protocol
from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.model.config import ModelConfig
from optolab.model.export import load, tl_inputs, to_hooked_transformer
from optolab.model.transformer import build_model
from optolab.protocol.loader import validate_protocol
from tests.conftest import repeat_protocol

# The two differ only in float rounding: TransformerLens' LayerNorm is written out (mean, variance,
# divide) where optolab calls F.layer_norm, and sums in another order. Measured over the options
# below with weights moved off their init (logits of magnitude ~5): at most 4.5e-6.
TOLERANCE = 1e-5
OPTIONS = list(itertools.product(["rope", "learned", "none"], [True, False], [True, False], [True, False]))


def _moved(cfg: ModelConfig):
    model = build_model(cfg, 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init, so zero biases and unit LayerNorm weights are tested as numbers
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("positional, layer_norm, attn_only, biases", OPTIONS,
                         ids=["-".join(map(str, o)) for o in OPTIONS])
def test_logits_equal_optolabs_for_every_option_that_maps(positional, layer_norm, attn_only, biases):
    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=48, d_out=40, d_vocab=40,
                      attn_only=attn_only, d_mlp=64, layer_norm=layer_norm, final_ln=layer_norm,
                      positional=positional, qkv_bias=biases, unembed_bias=biases)
    model = _moved(cfg)
    tl = to_hooked_transformer(model)
    tokens = torch.randint(40, (6, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(tokens), tl(tokens)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    # the weights are TransformerLens' own parameters, not a view of optolab's
    with torch.no_grad():
        model.W_U.add_(1.0)
    assert torch.allclose(tl(tokens), theirs)


@pytest.mark.parametrize("positional", ["rope", "learned", "none"])
def test_exemplar_models_enter_through_the_residual_stream(positional):
    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=9, d_out=6, input_mode="exemplar_label",
                      d_input=10, n_labels=6, positional=positional, qkv_bias=True)
    model = _moved(cfg)
    g = torch.Generator().manual_seed(3)
    exemplars, labels = torch.randn(5, 5, 10, generator=g), torch.randint(6, (5, 4), generator=g)
    args, kwargs = tl_inputs(model, exemplars, labels)
    with torch.no_grad():
        ours, theirs = model(exemplars, labels), to_hooked_transformer(model)(*args, **kwargs)
    assert kwargs == {"start_at_layer": 0} and (ours - theirs).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("change, words", [
    (dict(smeared_keys=True), "model.smeared_keys"),
    (dict(final_ln=False), "model.layer_norm: true with model.final_ln: false"),
    (dict(layer_norm=False), "model.layer_norm: false with model.final_ln: true"),
])
def test_what_does_not_map_is_refused_in_one_line_naming_it(change, words):
    base = dict(n_layers=1, n_heads=2, d_model=8, d_head=4, n_ctx=8, d_out=5, d_vocab=5)
    model = build_model(ModelConfig(**{**base, **change}), 0)
    with pytest.raises(OptolabError) as e:
        to_hooked_transformer(model)
    assert words in str(e.value) and "\n" not in str(e.value) and e.value.field == "model"


def test_a_runs_checkpoints_open_in_transformer_lens_and_export_from_the_shell(tmp_path, capsys):
    data = repeat_protocol(steps=20)
    data["model"]["positional"] = "rope"
    run = run_protocol(validate_protocol(data), out=tmp_path / "run", progress=False, plots=False)
    batch = run.eval_batch()
    for step in run.checkpoint_steps:
        tl = run.to_transformer_lens(step)
        with torch.no_grad():
            ours = run.model(step)(*batch.inputs)
            theirs, cache = tl.run_with_cache(batch.inputs[0])
        assert (ours - theirs).abs().max().item() <= TOLERANCE, step
    # TransformerLens' cache has optolab's hook names and the same activations
    forward_pattern = run.model(20)
    with torch.no_grad():
        saved = {}
        h = forward_pattern.blocks[1].attn.hook_pattern.register_forward_hook(lambda m, i, o: saved.update(p=o))
        forward_pattern(*batch.inputs)
        h.remove()
    assert torch.allclose(cache["blocks.1.attn.hook_pattern"], saved["p"], atol=1e-6)

    out = tmp_path / "exported.safetensors"
    assert main(["export", str(run.path), "--to", "transformer-lens", "--step", "10", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(load(out)(batch.inputs[0]), run.to_transformer_lens(10)(batch.inputs[0]))
    assert main(["export", str(run.path), "--to", "transformer-lens", "--step", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no checkpoint at step 7" in err and len(err.splitlines()) == 1
