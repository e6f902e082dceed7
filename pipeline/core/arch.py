"""Architecture adapter: where each family keeps its blocks, MLP, edited down-projection and head.

ROME edits the MLP *down-projection* (the matrix that maps the d_ff-dimensional MLP hidden state, the
"key", back to d_model, the "value").  GPT-2 stores it as a Conv1D whose weight is [in, out]; every other
family uses nn.Linear with weight [out, in].  ``down_proj_conv1d`` records which.

Code that applies the LM head by hand (to pay for the vocabulary only where a loss looks) goes through
``ArchSpec.logits``, which also applies what the model's own forward does after the head (Gemma 2's tanh
soft-cap of the final logits), so it sees the model's distribution in every family.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rome.pipeline.core.hooks import get_module
from rome.pipeline.errors import UserError

__all__ = ["ArchSpec", "FAMILIES", "arch_for", "cache_kwarg"]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    blocks: str  # the ModuleList of transformer blocks
    mlp: str  # the MLP, relative to a block
    down_proj: str  # the edited down-projection, relative to a block
    down_proj_conv1d: bool  # True: weight is [in, out] (GPT-2 Conv1D); False: nn.Linear [out, in]
    attn: str  # the attention module, relative to a block
    embed: str  # the token embedding
    final_norm: str  # the norm before the LM head
    lm_head: str  # the output projection
    # the norm the MLP output passes before it joins the residual stream, relative to a block (Gemma 2/3, OLMo 2:
    # post_feedforward_layernorm); None where the down-projection's output is added as it is. MEMIT's targets
    # are residual-stream shifts that assume no such norm: MEMIT and AlphaEdit refuse these models (editors/memit.py).
    mlp_out_norm: str | None = None
    # the edited module where it is not ``down_proj``, as (layer, module relative to a block) pairs: UltraEdit's
    # release edits gate_proj in some Llama-3 layers and up_proj in others (config: model.arch.down_proj_by_layer)
    down_proj_by_layer: tuple[tuple[int, str], ...] = ()

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp}"

    def down_proj_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{dict(self.down_proj_by_layer).get(layer, self.down_proj)}"

    def mlp_out_norm_name(self, layer: int) -> str | None:
        return None if self.mlp_out_norm is None else f"{self.blocks}.{layer}.{self.mlp_out_norm}"

    def attn_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn}"

    def num_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.blocks))

    def check_layer(self, model: nn.Module, layer: int, what: str = "layer") -> int:
        n = self.num_layers(model)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise UserError(f"{what}={layer} is out of range: this model has layers 0..{n - 1}")
        return layer

    def down_proj_weight(self, model: nn.Module, layer: int) -> nn.Parameter:
        return get_module(model, self.down_proj_name(layer)).weight

    def down_proj_matrix(self, model: nn.Module, layer: int) -> torch.Tensor:
        """W as [d_model, d_ff] (out x in) whatever the storage orientation, a view of the parameter."""
        w = self.down_proj_weight(model, layer)
        return w.T if self.down_proj_conv1d else w

    def key_size(self, model: nn.Module, layer: int) -> int:
        return self.down_proj_matrix(model, layer).shape[1]

    def logits(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The model's own logits (float32) for hidden states ``h`` taken after the final norm: the LM head,
        then the final-logit soft-cap ``tanh(z / cap) x cap`` where the config sets one (Gemma 2 and 3 read
        ``final_logit_softcapping`` in their forward; the other families have none)."""
        z = get_module(model, self.lm_head)(h)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            z = torch.tanh(z / cap) * cap
        return z.float()

    def validate(self, model: nn.Module) -> ArchSpec:
        names = [self.blocks, self.embed, self.final_norm, self.lm_head]
        names += [self.mlp_name(0), self.down_proj_name(0), self.attn_name(0)]
        names += [self.mlp_out_norm_name(0)] if self.mlp_out_norm is not None else []
        names += [self.down_proj_name(layer) for layer, _ in self.down_proj_by_layer]
        missing = [n for n in names if not _has(model, n)]
        if missing:
            raise UserError(
                f"{type(model).__name__} has no module(s) {', '.join(missing)}; "
                "set the right paths with model.arch.<field>=... (see configs/config.yaml)"
            )
        return self


def _module_per_layer(by_module: Any, num_layers: int) -> tuple[tuple[int, str], ...]:
    """``{module: [layers]}`` (model.arch.down_proj_by_layer, the release's grouping) as sorted (layer, module)
    pairs, one module per layer."""
    example = "{mlp.gate_proj: [10, 11], mlp.up_proj: [17, 18]}"
    if not isinstance(by_module, Mapping):
        raise UserError(f"model.arch.down_proj_by_layer={by_module} must map modules to their layers, e.g. {example}")
    owner: dict[int, str] = {}
    for module, layers in by_module.items():
        layers = [layers] if isinstance(layers, int) else layers
        if not isinstance(module, str) or not isinstance(layers, list | tuple) or not layers:
            raise UserError(
                f"model.arch.down_proj_by_layer: {module}: {layers} must be a module and its layers, e.g. {example}"
            )
        for layer in layers:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < num_layers:
                raise UserError(
                    f"model.arch.down_proj_by_layer: layer {layer} of {module} is out of range: this model has layers "
                    f"0..{num_layers - 1}"
                )
            if layer in owner and owner[layer] != module:
                raise UserError(
                    f"model.arch.down_proj_by_layer names layer {layer} for both {owner[layer]} and {module}: an "
                    "editor edits one module per layer (edit the two in separate runs)"
                )
            owner[layer] = module
    return tuple(sorted(owner.items()))


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


_LLAMA_LIKE = dict(
    blocks="model.layers",
    mlp="mlp",
    down_proj="mlp.down_proj",
    down_proj_conv1d=False,
    attn="self_attn",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        blocks="transformer.h",
        mlp="mlp",
        down_proj="mlp.c_proj",
        down_proj_conv1d=True,
        attn="attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    "gptj": dict(
        blocks="transformer.h",
        mlp="mlp",
        down_proj="mlp.fc_out",
        down_proj_conv1d=False,
        attn="attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    "gpt_neox": dict(
        blocks="gpt_neox.layers",
        mlp="mlp",
        down_proj="mlp.dense_4h_to_h",
        down_proj_conv1d=False,
        attn="attention",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head=("lm_head", "embed_out"),  # transformers 5 renamed embed_out
    ),
    # Gemma 1-3 only differ in what the stages never touch by hand: (1 + w) RMS norms, the norm after the
    # attention, sqrt(d)-scaled embeddings, tied LM head, sliding-window layers, the soft-cap (``ArchSpec.logits``),
    # except the norm after the MLP (Gemma 2/3, OLMo 2: ``mlp_out_norm``), which breaks MEMIT's targets.
    # Every family here is tested against the model's own forward (tests/conftest.py).
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo")},
    **{t: {**_LLAMA_LIKE, "mlp_out_norm": "post_feedforward_layernorm"} for t in ("gemma2", "gemma3_text", "olmo2")},
}


@functools.cache
def _cache_kwarg(forward_owner: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.2x on (``past_key_values``
    is deprecated there and removed in 5.40), ``past_key_values`` before."""
    return _cache_kwarg(type(model))


def arch_for(model: nn.Module, overrides: Mapping[str, Any] | None = None) -> ArchSpec:
    """The adapter for ``model`` from its ``config.model_type``, with fields overridden from config."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # a tuple lists candidate paths across transformers versions: take the first the model has
    fields = {
        k: next((c for c in v if _has(model, c)), v[0]) if isinstance(v, tuple) else v
        for k, v in FAMILIES.get(model_type, {}).items()
    }
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    required = [f.name for f in dataclasses.fields(ArchSpec) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in fields]
    if missing:
        raise UserError(
            f"unsupported architecture '{model_type}': known are {', '.join(sorted(FAMILIES))}; "
            f"name its modules with model.arch.{missing[0]}=... (fields: {', '.join(missing)})"
        )
    by_layer = fields.pop("down_proj_by_layer", ())
    spec = ArchSpec(**fields).validate(model)
    if not by_layer:
        return spec
    by_layer = _module_per_layer(by_layer, spec.num_layers(model))
    return dataclasses.replace(spec, down_proj_by_layer=by_layer).validate(model)
