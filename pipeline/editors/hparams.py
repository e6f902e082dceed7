"""Typed hyperparameters of every editor: what each method reads, with its type, and no default.

The values live in ``configs/`` only (``configs/config.yaml``'s ``edit`` group, a model file's ``edit:`` block,
a method file); these dataclasses say which of them a method uses and what type each must have. ``typed``
checks a config node against one (OmegaConf structured configs: a wrong type or a missing key is an error
naming the key) and returns a read-only node with attribute access, so the math reads ``hp.v.lr`` as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rome.pipeline.errors import UserError

__all__ = [
    "ValueHparams",
    "RomeValueHparams",
    "NormAnchorHparams",
    "TemplateHparams",
    "VerifyHparams",
    "RomeHparams",
    "MemitHparams",
    "BatchHparams",
    "AlphaEditHparams",
    "FineTuneHparams",
    "UltraEditHparams",
    "typed",
]

T = TypeVar("T")


@dataclasses.dataclass
class ValueHparams:
    """The v* (ROME) or z (MEMIT) optimisation: Adam on δ, ROME's loss."""

    lr: float
    steps: int
    early_stop_loss: float
    kl_factor: float  # weight of the KL term that keeps the subject's other predictions
    weight_decay: float  # weight of ‖δ‖ / ‖v₀‖²
    clamp_norm_factor: float  # ‖δ‖ ≤ this x ‖v₀‖ after every step
    most_probable_stop: int  # MPES (ENCORE): stop at the N-th step the new object is on top in every row; 0: off


@dataclasses.dataclass
class RomeValueHparams(ValueHparams):
    """ROME's v*: the optimisation and what is done with its result."""

    norm_anchor: bool  # NAS: v* rescaled to the reference norm (``NormAnchorHparams``)


@dataclasses.dataclass
class NormAnchorHparams:
    """Norm-Anchor Scaling (NAS, arXiv 2602.02543; ``pipeline/editors/value.py`` ``norm_anchor``), used by the
    methods whose ``norm_anchor`` is on (``edit.v``, ``edit.memit``, ``edit.alphaedit``)."""

    skip_factor: float  # a solved v* longer than this x the reference is dropped (δ' = 0)
    trim: float  # the reference: mean ‖v*‖ as solved over the first unit(s), this largest fraction dropped
    reference_values: int  # the reference is taken over the first units until this many values are in (1: one unit)


@dataclasses.dataclass
class TemplateHparams:
    """Context templates: "{}" plus prefixes sampled from the model (``pipeline/editors/templates.py``)."""

    style: str  # seeded | original
    seeds: list[str]
    lengths: list[list[int]]  # (tokens, how many)
    top_k: int


@dataclasses.dataclass
class VerifyHparams:
    """``edit.verify``: whether an edit took (``pipeline/editors/verification.py``) and is not a disabling one."""

    enabled: bool
    rollback: bool
    batch_size: int
    answer_tokens: int
    generative: bool  # took = the greedy continuation starts with the new object; false: P(new) >= min_p_new
    chat: Any  # null/auto | true | false: with generative, the chat template's answer naming it also counts
    chat_prompt: str  # the chat form's user message, {prompt} where the prompt goes
    min_p_new: float
    max_relative_update: float
    min_denominator: float


@dataclasses.dataclass
class RomeHparams:
    layer: int
    variant: str  # averaged | rrome | original
    mom2_adjustment: bool
    ridge: float
    generate_tokens: int
    kl_prompts: list[str]
    templates: TemplateHparams
    v: RomeValueHparams
    verify: VerifyHparams
    nas: NormAnchorHparams


@dataclasses.dataclass
class MemitHparams:
    mom2_update_weight: float  # λ in R Kᵀ (λC + K Kᵀ)⁻¹
    norm_constraint: float  # ENCORE's λ_n in R Kᵀ (λC + λ_n I + K Kᵀ)⁻¹: the penalty λ_n ‖ΔW‖² per batch (memit only)
    preserve_edits: bool  # ENCORE / EMMET: + Σ K Kᵀ of every earlier batch, so later batches keep the earlier edits
    rows_per_pass: int
    micro_batch: Any  # requests per z micro-batch: null / auto or a number (the same z either way: not identity)
    templates: TemplateHparams
    v: ValueHparams
    norm_anchor: bool  # NAS on z's MLP part (``NormAnchorHparams``)
    allow_mlp_out_norm: bool  # run on a model whose MLP output is normed before the residual add (refused: off)


@dataclasses.dataclass
class AlphaEditHparams:
    nullspace_threshold: float  # eigenvalues below this x the mean eigenvalue span the null space
    l2: float  # α in (K Kᵀ P + α I)⁻¹
    norm_anchor: bool  # NAS on z's MLP part (``NormAnchorHparams``), AlphaEdit's own switch


@dataclasses.dataclass
class BatchHparams:
    """MEMIT and AlphaEdit (AlphaEdit reads both blocks)."""

    ridge: float
    kl_prompts: list[str]
    memit: MemitHparams
    alphaedit: AlphaEditHparams
    nas: NormAnchorHparams


@dataclasses.dataclass
class FineTuneHparams:
    layer: int | None  # null: the run's edit layer
    lr: float
    steps: int
    norm_constraint: float  # the L∞ radius around the original weights
    early_stop_loss: float


@dataclasses.dataclass
class UltraEditHparams:
    """UltraEdit (``pipeline/editors/ultraedit.py``): its layers, the one-step shift and its normalisation."""

    layers: list[int] | None  # null: edit.layers
    lr: float  # η in v = −η ‖ĥ‖² ĝ
    ridge: float  # λ in ΔW = Vᵀ H (HᵀH + λI)⁻¹
    eps: float  # ε in (z − μ) / (σ + ε)
    statistics: str  # shared | per_layer
    rows_per_pass: int
    preserve: str  # none | nullspace: the keys projected onto C's null space before the solve
    nullspace_threshold: float  # eigenvalues below this x the mean eigenvalue span the null space
    position: str  # answer | subject: where the keys and gradients are read
    covariance_weight: float  # μ in ΔW = Vᵀ H (HᵀH + μC + λI)⁻¹ (preserve=covariance)


def typed(schema: type[T], node: Any, where: str = "edit") -> T:
    """``node``'s keys that ``schema`` names, type-checked against it; read-only. A missing key or a value of
    the wrong type is a ``UserError`` naming the key (under ``where``)."""
    keys = [f.name for f in dataclasses.fields(schema)]
    picked = {k: node[k] for k in keys if k in node}
    try:
        out = OmegaConf.merge(OmegaConf.structured(schema), picked)
    except OmegaConfBaseException as err:
        raise UserError(f"{where}.{err.full_key}: {str(err).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(out))
    if missing:
        raise UserError(f"{where}: {', '.join(f'{where}.{k}' for k in missing)} missing (every key is in configs/)")
    OmegaConf.set_readonly(out, True)
    return out  # a DictConfig typed by ``schema``
