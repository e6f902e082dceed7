"""A ledger's remaining edits as a PEFT LoRA adapter: ``peft.PeftModel.from_pretrained(base, DIR)`` loads it, and
``merge_and_unload()`` gives the edited model.

Every edit the ledger records is a low-rank update of one down-projection: ROME's ΔW = Λ uᵀ is rank one, a
MEMIT / AlphaEdit / UltraEdit batch's ΔW = L Rᵀ has rank at most its batch size per layer. PEFT's LoRA adds
(lora_alpha / r) B A to a module's weight, with A [r, d_in] and B [d_out, r] in the math orientation (out x in)
whatever the storage; so the sum of a module's edits is exactly B = [Λ₁ | L₂ | ...], A = [u₁ᵀ; R₂ᵀ; ...] with
lora_alpha = r (scale 1). Concatenating is exact, with no SVD: the rank is the number of rank-one edits of the
module plus its batch ranks, and ``export_adapter`` says so when that makes the adapter larger than a dense ΔW.
GPT-2's Conv1D stores [in, out]: ``fan_in_fan_out`` tells PEFT, and A and B stay as they are.

The factors are read from the ledger (each file checked against its sha256) in float64 and cast once to the
adapter's dtype (by default the model's): a bfloat16 adapter holds the factors to bfloat16 precision, so the
adapter model agrees with the edited model to that precision, not bitwise. The directory is written as a whole
(``pipeline/core/saving.write_marked_dir``: only a new or empty directory, or one this project wrote, is
replaced); ``rome_adapter.json`` beside the adapter says which ledger, edits and base model it holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rome.pipeline.core.atomic import write_tensors
from rome.pipeline.core.digest import file_sha256
from rome.pipeline.core.loading import EMBEDDED, resolve_dtype
from rome.pipeline.core.saving import ADAPTER_MARKER, check_destination, write_marked_dir
from rome.pipeline.errors import UserError

if TYPE_CHECKING:  # only its type: core sits below the editors, which hand the ledger in
    from rome.pipeline.editors.ledger import Ledger

__all__ = ["ModuleUpdate", "FORMATS", "CONFIG_FILE", "WEIGHTS_FILE", "ledger_updates", "export_adapter"]

FORMATS = ("peft",)  # export.format
CONFIG_FILE = "adapter_config.json"  # the names PeftModel.from_pretrained reads
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclasses.dataclass
class ModuleUpdate:
    """The summed edits of one down-projection, ΔW = B A (float64, [d_out, d_in] = out x in)."""

    module: str  # its name in the model, e.g. model.layers.6.mlp.down_proj
    conv1d: bool  # stored [in, out] (GPT-2 Conv1D)
    lora_a: torch.Tensor  # A [r, d_in]
    lora_b: torch.Tensor  # B [d_out, r]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def dense_is_smaller(self) -> bool:
        """Whether a dense ΔW (d_out x d_in numbers) would take less room than the factors."""
        d_out, d_in = self.lora_b.shape[0], self.lora_a.shape[1]
        return self.rank * (d_out + d_in) > d_out * d_in


def _balanced(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B, A for ΔW = left rightᵀ (columns are rank-one terms) with each term's two vectors of equal norm: the
    product is the same, and neither factor is far from 1 in size (u = C⁻¹k* can be large and Λ small, which a
    float16 adapter would overflow or flush to zero)."""
    left, right = left.double(), right.double()
    lnorm, rnorm = left.norm(dim=0), right.norm(dim=0)
    scale = torch.where((lnorm > 0) & (rnorm > 0), (rnorm / lnorm.clamp_min(1e-300)).sqrt(), torch.ones_like(lnorm))
    return left * scale, (right / scale).T


def ledger_updates(ledger: Ledger) -> dict[str, ModuleUpdate]:
    """The remaining (applied) edits of ``ledger``, summed per module as LoRA factors in float64. Every file is
    read and checked against its checksum first."""
    active = ledger.active()
    if not active:
        raise UserError(
            f"ledger {ledger.dir} has no applied edits ({len(ledger.entries)} recorded, none applied): nothing to "
            f"export; edit with edit.out={ledger.dir} first"
        )
    terms: dict[str, list[tuple[bool, torch.Tensor, torch.Tensor]]] = {}  # module -> (conv1d, left, right)
    for entry in active:
        conv1d = bool(entry.get("conv1d"))
        if entry.get("kind") == "batch":
            modules = ledger.modules(entry)
            for layer, update in ledger.low_rank(entry).items():
                terms.setdefault(modules[layer], []).append((conv1d, update.left, update.right))
        else:
            edit = ledger.rank_one(entry)
            terms.setdefault(entry["module"], []).append((conv1d, edit.lam[:, None], edit.u[:, None]))
    out = {}
    for module, parts in terms.items():
        shapes = {(left.shape[0], right.shape[0]) for _, left, right in parts}
        if len(shapes) != 1 or len({conv1d for conv1d, _, _ in parts}) != 1:
            raise UserError(
                f"the ledger's edits of {module} disagree on its shape or orientation ({sorted(shapes)}); "
                "restore the ledger from a copy"
            )
        factors = [_balanced(left, right) for _, left, right in parts]
        out[module] = ModuleUpdate(
            module=module,
            conv1d=parts[0][0],
            lora_a=torch.cat([a for _, a in factors]),
            lora_b=torch.cat([b for b, _ in factors], dim=1),
        )
    return out


def _pattern(module: str) -> str:
    """A ``rank_pattern`` key that matches ``module`` alone: PEFT matches these keys as regular expressions
    against the end of each module's name (after a dot), so the name without its first component, escaped."""
    return re.escape(module.split(".", 1)[-1])


def adapter_config(updates: dict[str, ModuleUpdate], base_model: str, revision: str | None) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter adding exactly ``updates``: lora_alpha = r everywhere (scale 1),
    the modules named exactly, one rank for most and ``rank_pattern`` / ``alpha_pattern`` for the others."""
    ranks = [u.rank for u in updates.values()]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r))
    others = {_pattern(u.module): u.rank for u in updates.values() if u.rank != common}
    conv1d = {u.conv1d for u in updates.values()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision,
        "inference_mode": True,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(updates),
        "lora_dropout": 0.0,
        "fan_in_fan_out": conv1d == {True},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def adapter_tensors(updates: dict[str, ModuleUpdate], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter's weights under the names PEFT saves them by (``base_model.model.<module>.lora_A.weight``),
    cast once from float64 to ``dtype``."""
    out = {}
    for name, u in updates.items():
        out[f"base_model.model.{name}.lora_A.weight"] = u.lora_a.to(dtype).contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = u.lora_b.to(dtype).contiguous()
    return out


def _hub_revision(identity: dict[str, str]) -> str | None:
    """The identity's revision when it is a hub commit (a local or embedded model's is a weights digest)."""
    revision = identity.get("revision") or ""
    return revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None


def export_adapter(
    ledger: Ledger, directory: str | os.PathLike, what: str = "export.out", dtype: str | torch.dtype | None = None
) -> Path:
    """Write the ledger's remaining edits as a PEFT LoRA adapter into ``directory`` (a new or empty directory,
    or one this project wrote) in ``dtype`` (default: the ledger's model dtype); returns the directory."""
    target = check_destination(directory, what, protect=(ledger.dir,))
    if dtype is None:
        dtype = ledger.data.get("model_dtype") or "float32"
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(str(dtype), "export.dtype")
    updates = ledger_updates(ledger)
    larger = [u.module for u in updates.values() if u.dense_is_smaller()]
    if larger:
        print(
            f"note: the edits of {', '.join(larger)} have rank {max(updates[m].rank for m in larger)}, more than a "
            "dense update would take; the adapter is exact but not small"
        )
    identity = ledger.data["model"]
    config = adapter_config(updates, identity["name"], _hub_revision(identity))
    tensors = adapter_tensors(updates, torch_dtype)

    def write(tmp: Path) -> dict[str, Any]:
        weights_digest = write_tensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return {"sha256": {CONFIG_FILE: file_sha256(tmp / CONFIG_FILE), WEIGHTS_FILE: weights_digest}}

    info: dict[str, Any] = {
        "what": "a PEFT LoRA adapter of the ledger's applied edits: PeftModel.from_pretrained(base, this directory)",
        "format": "peft",
        "base_model": identity,
        "ledger": str(ledger.dir.resolve()),
        "ledger_checksum": ledger.data.get("checksum"),
        "edits": [e["id"] for e in ledger.active()],
        "dtype": str(torch_dtype).removeprefix("torch."),
        "modules": {name: u.rank for name, u in sorted(updates.items())},
    }
    if identity["name"] in EMBEDDED:
        info["note"] = (
            f"the base is this project's embedded {identity['name']} (its GGUF dequantised, "
            f"{identity['revision']}), not the hub's {EMBEDDED[identity['name']].hub_id}: load it with "
            f"rome.load_model('{identity['name']}')"
        )
    return write_marked_dir(target, what, write, info, marker=ADAPTER_MARKER)
