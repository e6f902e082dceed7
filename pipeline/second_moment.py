"""C = E[k k^T]: the uncentred second moment of the keys entering an MLP down-projection, and its cache.

The cache holds one safetensors file per layer plus ``manifest.json``, in a directory named by a digest
of everything the statistics depend on (``StatsKey``).  Files are written atomically and carry a
checksum in the manifest, so a later stage never reuses wrong or damaged statistics silently.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_json
from .digest import file_sha256, json_digest, slug
from .errors import UserError

__all__ = ["accumulate_second_moment", "StatsKey", "StatsCache", "LayerStats"]


def accumulate_second_moment(total: torch.Tensor, keys: torch.Tensor) -> None:
    """``total += keys^T keys`` in ``total``'s dtype; ``keys`` is [tokens, d_ff], one row per token."""
    k = keys.to(total.dtype)
    total.addmm_(k.T, k)


@dataclasses.dataclass(frozen=True)
class StatsKey:
    """Everything the statistics depend on. Two runs with equal keys produce the same C."""

    model: dict[str, str]  # {"name", "revision"}
    model_dtype: str
    dataset: dict[str, Any]
    max_length: int
    tokens: int
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return json_digest(self.as_dict())


@dataclasses.dataclass
class LayerStats:
    layer: int
    module: str
    second_moment: torch.Tensor  # [d_ff, d_ff] = sum k k^T / count
    count: int
    path: Path


class StatsCache:
    """``root/<model>-<digest>/{manifest.json, layer_<l>.safetensors}``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: StatsKey) -> Path:
        return self.root / f"{slug(key.model['name'])}-{key.digest()}"

    def _manifest(self, key: StatsKey) -> dict[str, Any]:
        path = self.entry_dir(key) / "manifest.json"
        if not path.exists():
            return {"key": key.as_dict(), "layers": {}}
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            path.unlink()
            raise UserError(f"statistics manifest {path} was corrupt and has been removed; run the command again to recompute") from err
        if manifest.get("key") != key.as_dict():
            raise UserError(f"statistics in {path.parent} were made for another model or dataset; delete that directory")
        return manifest

    def has(self, key: StatsKey, layer: int) -> bool:
        return str(layer) in self._manifest(key)["layers"]

    def load(self, key: StatsKey, layer: int, module: str) -> LayerStats | None:
        """The cached statistics for ``layer``, None when absent; corrupt files are removed loudly."""
        manifest = self._manifest(key)
        entry = manifest["layers"].get(str(layer))
        if entry is None:
            return None
        if entry["module"] != module:
            raise UserError(f"cached statistics of layer {layer} are for module {entry['module']}, not {module}; "
                            f"delete {self.entry_dir(key)}")
        path = self.entry_dir(key) / entry["file"]
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
        if problem:
            self._drop(key, layer)
            raise UserError(f"statistics file {path} {problem}; it has been removed: run `python train.py stage=stats` "
                            "with the same settings to recompute it")
        return LayerStats(layer, module, tensors["second_moment"], int(entry["tokens"]), path)

    def _drop(self, key: StatsKey, layer: int) -> None:
        manifest = self._manifest(key)
        entry = manifest["layers"].pop(str(layer), None)
        write_json(self.entry_dir(key) / "manifest.json", manifest)
        if entry:
            (self.entry_dir(key) / entry["file"]).unlink(missing_ok=True)

    def save(self, key: StatsKey, layer: int, module: str, total: torch.Tensor, count: int) -> Path:
        """Write C = total / count for ``layer`` (file first, then the manifest that points at it)."""
        if count <= 0:
            raise UserError("no tokens were read; check data.files / data.text_field")
        directory = self.entry_dir(key)
        path = directory / f"layer_{layer}.safetensors"
        with atomic_path(path) as tmp:
            save_file({"second_moment": (total / count).contiguous(), "count": torch.tensor([count])}, str(tmp),
                      metadata={"module": module, "layer": str(layer)})
        manifest = self._manifest(key)
        manifest["layers"][str(layer)] = {
            "module": module, "file": path.name, "sha256": file_sha256(path), "tokens": count,
            "d_ff": int(total.shape[0]), "dtype": str(total.dtype).removeprefix("torch."),
        }
        write_json(directory / "manifest.json", manifest)
        return path
