"""C = E[k k^T]: the uncentred second moment of the keys entering an MLP down-projection, and its cache.

Accumulation (``accumulate_second_moment``): the keys arrive in the model's dtype; the running total Σ k kᵀ
is kept in float64 (``stats.dtype``). ``product="fp32"`` (the default) forms each block's kᵀk with float32
accumulation, the fast path (bf16/fp16 keys on a GPU: one tensor-core GEMM with float32 output, whose
products of bf16 numbers are exact; float32 keys: an IEEE float32 GEMM, TF32 forced off) and adds it into
the float64 total; ``product="exact"`` casts the keys to the total's dtype first (the all-float64 path).
The fast path's relative Frobenius error against the exact one is about 1e-7 on real keys (budget: 1e-6;
README, "Precision budget"). The same batches give the same bits, so resumed and multi-process runs stay
identical (the batches do not depend on the number of processes: ``pipeline.text``).

The cache holds one safetensors file per layer plus ``manifest.json`` in a directory (``StatsEntry``); the
cache's own directories are named by a digest of everything the statistics depend on (``StatsKey``). Files
are written atomically and carry a checksum in the manifest, so a later stage never reuses wrong or damaged
statistics silently. A directory the user points at (``edit.stats=DIR``: copied, archived, shared) is read
by its manifest alone and never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.digest import file_sha256, json_digest, slug
from pipeline.errors import UserError

__all__ = ["PRODUCTS", "PRODUCT_TOKENS", "accumulate_second_moment", "ieee_fp32_matmul", "StatsKey", "StatsEntry",
           "StatsCache", "LayerStats"]

PRODUCTS = ("fp32", "exact")
PRODUCT_TOKENS = 8192  # keys per float32 product: float32 sums over longer runs of keys lose more bits


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Float32 matmuls on ``device`` in IEEE float32 for the block, whatever the process set globally
    (``torch.set_float32_matmul_precision("high")`` turns on TF32 on a GPU, bf16 passes in oneDNN on a CPU:
    relative errors of 1e-5 to 1e-3, far over the budget). Setting the flag costs no device sync."""
    backend = {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}.get(device.type)
    old = getattr(backend, "fp32_precision", None)
    if old is None or old == "ieee":
        yield
        return
    backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = old


@functools.lru_cache(maxsize=None)
def _has_float32_output_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for ``dtype`` on ``device`` (CUDA builds of
    recent torch, for bf16 / fp16); asked once per device and dtype, never per batch."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        torch.mm(a.T, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError):
        return False


def _fp32_product(keys: torch.Tensor) -> torch.Tensor:
    if _has_float32_output_mm(keys.device, keys.dtype):
        return torch.mm(keys.T, keys, out_dtype=torch.float32)  # tensor cores, float32 accumulation and output
    k = keys.float()  # exact: every bf16/fp16 value is a float32 value
    return k.T @ k


def accumulate_second_moment(total: torch.Tensor, keys: torch.Tensor, product: str = "fp32") -> None:
    """``total += keys^T keys``; ``keys`` is [tokens, d_ff], one row per token (see the module docstring
    for ``product``). No host-device sync."""
    if product == "exact":
        k = keys.to(total.dtype)
        total.addmm_(k.T, k)
        return
    if product != "fp32":
        raise ValueError(f"product={product!r} is not one of {PRODUCTS}")
    with ieee_fp32_matmul(keys.device):
        for block in keys.split(PRODUCT_TOKENS):
            total.add_(_fp32_product(block))


@dataclasses.dataclass(frozen=True)
class StatsKey:
    """Everything the statistics depend on. Two runs with equal keys produce the same C."""

    model: dict[str, str]  # {"name", "revision"}
    model_dtype: str
    dataset: dict[str, Any]
    max_length: int
    tokens: int  # the budget asked for (a layer's entry records the tokens actually read)
    dtype: str  # the running total's
    product: str = "exact"  # the per-batch product's (manifests written before it existed used the exact path)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return json_digest(self.as_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StatsKey":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class LayerStats:
    layer: int
    module: str
    second_moment: torch.Tensor  # [d_ff, d_ff] = sum k k^T / count
    count: int  # tokens read
    path: Path
    requested: int = 0  # the token budget the statistics were asked for (more than count: the data ran out)

    @property
    def shortfall(self) -> int:
        return max(0, self.requested - self.count)


class StatsEntry:
    """One statistics directory: ``manifest.json`` and ``layer_<l>.safetensors`` (+ the convergence plot).

    ``key``: the statistics this directory must hold (the cache's own entries); None for a directory the
    user named, which is taken as its manifest describes it. ``owned``: the cache's own directory, whose
    damaged files are removed (so that the same command recomputes them); a user's directory is only read."""

    def __init__(self, directory: str | Path, key: StatsKey | None = None, *, owned: bool = True, label: str | None = None) -> None:
        self.dir, self.key, self.owned = Path(directory), key, owned
        self.label = label or str(self.dir)

    def manifest(self) -> dict[str, Any]:
        path = self.dir / "manifest.json"
        if not path.exists():
            if self.key is not None:
                return {"key": self.key.as_dict(), "layers": {}}
            raise UserError(f"{self.label} has no manifest.json{self._hint()}")
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest.get("key"), dict) or not isinstance(manifest.get("layers"), dict):
                raise ValueError("no key or layers")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, AttributeError) as err:
            if self.owned:
                path.unlink()
                raise UserError(f"statistics manifest {path} was corrupt and has been removed; run the command again to recompute") from err
            raise UserError(f"{path} is not a statistics manifest ({err}); point {self.label} at a directory the stats stage wrote") from err
        if self.key is not None and manifest["key"] != self.key.as_dict():
            raise UserError(f"statistics in {self.dir} were made for another model or dataset; delete that directory")
        return manifest

    def _hint(self) -> str:
        inner = sorted(p.parent.name for p in self.dir.glob("*/manifest.json"))
        if inner:
            return f": it holds statistics directories ({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}); point it at one of them"
        return "; point it at a directory the stats stage wrote (its output names it)"

    def stats_key(self) -> StatsKey:
        return self.key or StatsKey.from_dict(self.manifest()["key"])

    def layers(self) -> list[int]:
        return sorted(int(l) for l in self.manifest()["layers"])

    def load(self, layer: int, module: str) -> LayerStats | None:
        """The statistics of ``layer``, None when absent; a damaged file is an error (and removed when owned)."""
        manifest = self.manifest()
        entry = manifest["layers"].get(str(layer))
        if entry is None:
            return None
        if entry["module"] != module:
            raise UserError(f"statistics of layer {layer} in {self.dir} are for module {entry['module']}, not {module}"
                            + (f"; delete {self.dir}" if self.owned else ""))
        path = self.dir / entry["file"]
        problem = None
        if not path.exists():
            problem = "is missing"
        elif file_sha256(path) != entry["sha256"]:
            problem = "is corrupt (checksum mismatch)"
        else:
            try:
                tensors = load_file(path)
            except (SafetensorError, OSError) as err:
                problem = f"is unreadable ({err})"
        if problem and self.owned:
            self._drop(layer)
            raise UserError(f"statistics file {path} {problem}; it has been removed: run `python train.py stage=stats` "
                            "with the same settings to recompute it")
        if problem:
            raise UserError(f"statistics file {path} {problem}; copy it again from where it came from, or recompute it "
                            "with stage=stats")
        requested = int(manifest["key"].get("tokens", 0))
        return LayerStats(layer, module, tensors["second_moment"], int(entry["tokens"]), path, requested)

    def _drop(self, layer: int) -> None:
        manifest = self.manifest()
        entry = manifest["layers"].pop(str(layer), None)
        write_json(self.dir / "manifest.json", manifest)
        if entry:
            (self.dir / entry["file"]).unlink(missing_ok=True)

    def save(self, layer: int, module: str, total: torch.Tensor, count: int, **record: Any) -> Path:
        """Write C = total / count for ``layer`` (file first, then the manifest that points at it); ``record``
        adds JSON fields to the layer's manifest entry (the convergence curve, a shortfall)."""
        if count <= 0:
            raise UserError("no tokens were read; check data.files / data.text_field")
        path = self.dir / f"layer_{layer}.safetensors"
        with atomic_path(path) as tmp:
            save_file({"second_moment": (total / count).contiguous(), "count": torch.tensor([count])}, str(tmp),
                      metadata={"module": module, "layer": str(layer)})
        manifest = self.manifest()
        manifest["layers"][str(layer)] = {
            "module": module, "file": path.name, "sha256": file_sha256(path), "tokens": count,
            "d_ff": int(total.shape[0]), "dtype": str(total.dtype).removeprefix("torch."), **record,
        }
        write_json(self.dir / "manifest.json", manifest)
        return path


class StatsCache:
    """``root/<model>-<digest>/``: one ``StatsEntry`` per ``StatsKey``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: StatsKey) -> Path:
        return self.root / f"{slug(key.model['name'])}-{key.digest()}"

    def entry(self, key: StatsKey) -> StatsEntry:
        return StatsEntry(self.entry_dir(key), key)

    def has(self, key: StatsKey, layer: int) -> bool:
        return str(layer) in self.entry(key).manifest()["layers"]

    def load(self, key: StatsKey, layer: int, module: str) -> LayerStats | None:
        """The cached statistics for ``layer``, None when absent; corrupt files are removed loudly."""
        return self.entry(key).load(layer, module)

    def save(self, key: StatsKey, layer: int, module: str, total: torch.Tensor, count: int, **record: Any) -> Path:
        return self.entry(key).save(layer, module, total, count, **record)
