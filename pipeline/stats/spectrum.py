"""C's eigendecomposition, cached beside C: what AlphaEdit's null-space projector is made from.

``torch.linalg.eigh`` of a d_ff x d_ff float64 matrix is the slow part of setting AlphaEdit up (d_ff = 14336
for Llama-3-8B: minutes on a CPU), and it does not depend on the projector's threshold, so the statistics
directory keeps it once per layer: ``eigh_layer_<l>.safetensors`` (eigenvalues ascending, eigenvectors as
columns, float64) with a sidecar ``eigh_layer_<l>.json`` naming the checksum of the C file it was computed
from and its own. A sidecar that does not match (C recomputed, a damaged file) means computing it again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rome.pipeline.core.atomic import write_json, write_tensors
from rome.pipeline.core.digest import file_sha256
from rome.pipeline.stats.store import LayerStats

__all__ = [
    "eigendecomposition",
    "cached_eigendecomposition",
    "null_space_projector",
    "null_space_share",
    "describe_null_space",
]


def eigendecomposition(
    second_moment: torch.Tensor, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """C = V diag(λ) Vᵀ in float64, computed on ``device`` (a GPU's eigh is far faster), returned on the CPU."""
    values, vectors = torch.linalg.eigh(second_moment.to(device=device, dtype=torch.float64))
    return values.cpu(), vectors.cpu()


def _paths(stats: LayerStats) -> tuple[Path, Path]:
    stem = f"eigh_layer_{stats.layer}"
    return stats.path.with_name(f"{stem}.safetensors"), stats.path.with_name(f"{stem}.json")


def cached_eigendecomposition(
    stats: LayerStats, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigendecomposition`` of ``stats``' C, read from beside its file when it was made from the same C."""
    data, sidecar = _paths(stats)
    source = file_sha256(stats.path)
    if data.exists() and sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text())
            if meta.get("source_sha256") == source and meta.get("sha256") == file_sha256(data):
                tensors = load_file(data)
                return tensors["eigenvalues"], tensors["eigenvectors"]
        except (json.JSONDecodeError, SafetensorError, OSError, KeyError):
            pass  # damaged: recomputed and rewritten below
    values, vectors = eigendecomposition(stats.second_moment, device)
    digest = write_tensors(
        data,
        {"eigenvalues": values.contiguous(), "eigenvectors": vectors.contiguous()},
        metadata={"layer": str(stats.layer), "source": stats.path.name},
    )
    write_json(sidecar, {"source": stats.path.name, "source_sha256": source, "sha256": digest})
    return values, vectors


def _in_null_space(values: torch.Tensor, relative_threshold: float) -> torch.Tensor:
    """The eigenvalues below ``relative_threshold`` x the mean eigenvalue (trace(C)/d): the one definition of the null
    space that the projector and its energy share both use."""
    return values < relative_threshold * values.mean()


def null_space_projector(
    values: torch.Tensor, vectors: torch.Tensor, relative_threshold: float
) -> tuple[torch.Tensor, int]:
    """P = U₀U₀ᵀ over C's eigenvectors whose eigenvalue is below ``relative_threshold`` x the mean eigenvalue
    (trace(C)/d: scale-free, and unlike a fraction of the largest one not set by a single outlier direction),
    in float64, and how many there are (P's rank)."""
    keep = _in_null_space(values, relative_threshold)
    u0 = vectors[:, keep]
    return u0 @ u0.T, int(keep.sum())


def null_space_share(values: torch.Tensor, relative_threshold: float) -> float:
    """tr(PC) / tr(C) for ``null_space_projector``'s P: the share of C's key energy inside P's range, 0 for a true
    null space. A model whose keys use every direction has none to spare (SmolLM2's subject keys: 13-17% at the
    threshold 0.5, docs/many-edits.md), and then an update confined to P still reaches the keys C was read from."""
    values = values.double()
    return float(values[_in_null_space(values, relative_threshold)].sum() / values.sum())


def describe_null_space(null_space: Mapping[int, tuple[int, float]], threshold_key: str) -> list[str]:
    """One line per layer (P's rank, C's energy in its range) and, where the range holds more than 5% of C's energy
    in some layer, a note that the projection preserves less than its name says."""
    lines = [
        f"layer {layer}: C's null space has {rank} dimensions, holding {share:.1%} of C's key energy"
        for layer, (rank, share) in null_space.items()
    ]
    worst = max((share for _, share in null_space.values()), default=0.0)
    if worst > 0.05:
        lines.append(
            f"note: up to {worst:.0%} of C's key energy lies in its 'null space': the edits also reach keys the "
            f"statistics' text uses (a lower {threshold_key} shrinks it; docs/many-edits.md, 'Why AlphaEdit does no "
            "better than MEMIT here')"
        )
    return lines
