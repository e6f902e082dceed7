import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from rome.pipeline.core.arch import FAMILIES as ADAPTER_FAMILIES
from rome.pipeline.core.arch import arch_for
from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.errors import UserError


def test_every_family_the_adapter_lists_has_a_tiny_model_in_the_tests():
    assert set(ADAPTER_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_real_modules_and_orientation(tiny_model_dir, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).eval()
    spec = arch_for(model)
    assert spec.num_layers(model) == 4
    assert spec.down_proj_conv1d == (family == "gpt2")
    w = spec.down_proj_matrix(model, 2)
    d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    assert w.shape[0] == d_model and w.shape[1] == spec.key_size(model, 2) > d_model
    # W as returned maps the key (the down-projection's input) to its output: out = W k (+ bias)
    ids = torch.tensor([[5, 17, 42, 7]])
    with Trace(get_module(model, spec.down_proj_name(2)), retain_input=True, retain_output=True) as t:
        model(ids)
    bias = getattr(get_module(model, spec.down_proj_name(2)), "bias", None)
    expect = t.input @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(t.output, expect, rtol=1e-5, atol=1e-5)
    for name in (spec.embed, spec.final_norm, spec.lm_head, spec.attn_name(0), spec.mlp_name(3)):
        get_module(model, name)
    # the families whose MLP output is normed before the residual add (MEMIT refuses them) name that norm, and it
    # is the module the MLP's output goes into
    assert (spec.mlp_out_norm is not None) == (family in ("gemma2", "gemma3_text", "olmo2"))
    if spec.mlp_out_norm is None:
        assert spec.mlp_out_norm_name(3) is None
        return
    norm = get_module(model, spec.mlp_out_norm_name(3))
    with Trace(get_module(model, spec.mlp_name(3)), retain_output=True) as mlp, Trace(norm, retain_input=True) as t:
        model(ids)
    torch.testing.assert_close(t.input, mlp.output, rtol=0, atol=0)


def test_layer_bounds_and_unknown_family(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    spec = arch_for(model)
    with pytest.raises(UserError, match="layers 0..3"):
        spec.check_layer(model, 4)
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="model.arch.blocks"):
        arch_for(model)
    # ... but a complete override from config works for any family
    fields = dict(
        blocks="transformer.h",
        mlp="mlp",
        down_proj="mlp.c_proj",
        down_proj_conv1d=True,
        attn="attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    )
    assert arch_for(model, fields).down_proj_name(1) == "transformer.h.1.mlp.c_proj"
    with pytest.raises(UserError, match="no module"):
        arch_for(model, {**fields, "blocks": "transformer.blocks"})
