"""The statistics store: what C depends on (``StatsKey``), where it lies on disk, looking it up, loading it
(checksums verified) and saving it. Computing what is missing needs a Trainer: ``modules/statistics.py``.

On disk a statistics directory (``StatsEntry``) holds ``manifest.json`` (the key and, per layer, the file,
its sha256, the tokens read and what the stage recorded: convergence curve, shortfall) and one
``layer_<l>.safetensors`` per layer ({"second_moment": C, "count": [tokens]}). The cache's own directories
are ``<stats.dir>/<model>-<key digest>/`` (``StatsCache``; ``stats.dir`` defaults to ``<cache root>/stats``),
one per key, so statistics made for another model, data or budget are never reused. Files are written
atomically, the file before the manifest that points at it, so a later stage never reuses wrong or damaged
statistics silently: a damaged file in the cache is removed (the same command recomputes it), one in a
directory the user named (``edit.stats=DIR``: copied, archived, shared) is reported and never modified.

``StatsStore`` is that cache as one run sees it (a configuration and a loaded model): one key, one
directory, lookup and save by layer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load_file

from rome.pipeline.core.atomic import ensure_free_space, write_json, write_tensors
from rome.pipeline.core.digest import file_sha256, json_digest, slug
from rome.pipeline.core.loading import LoadedModel, cache_root
from rome.pipeline.core.paths import contained
from rome.pipeline.errors import UserError
from rome.pipeline.stats.text import TextSource

__all__ = [
    "StatsKey",
    "LayerStats",
    "StatsEntry",
    "StatsCache",
    "StatsStore",
    "text_source",
    "stats_key",
    "accumulation_dtype",
    "batch_tokens",
    "check_layers",
    "load_explicit",
    "largest_cached",
    "stats_identity",
    "shortfall_warning",
]

# stats.dtype's values (pipeline/config.py CHOICES checks them when the configuration is composed)
_ACCUMULATION_DTYPES = {"float64": torch.float64, "float32": torch.float32}


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
    def from_dict(cls, d: dict[str, Any]) -> StatsKey:
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

    def __init__(
        self, directory: str | Path, key: StatsKey | None = None, *, owned: bool = True, label: str | None = None
    ) -> None:
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
                raise UserError(
                    f"statistics manifest {path} was corrupt and has been removed; run the command again to recompute"
                ) from err
            raise UserError(
                f"{path} is not a statistics manifest ({err}); point {self.label} at a directory the stats stage wrote"
            ) from err
        if self.key is not None and manifest["key"] != self.key.as_dict():
            raise UserError(f"statistics in {self.dir} were made for another model or dataset; delete that directory")
        return manifest

    def _hint(self) -> str:
        inner = sorted(p.parent.name for p in self.dir.glob("*/manifest.json"))
        if inner:
            return (
                f": it holds statistics directories ({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}); "
                "point it at one of them"
            )
        return "; point it at a directory the stats stage wrote (its output names it)"

    def stats_key(self) -> StatsKey:
        return self.key or StatsKey.from_dict(self.manifest()["key"])

    def layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.manifest()["layers"])

    def load(self, layer: int, module: str) -> LayerStats | None:
        """The statistics of ``layer``, None when absent; a damaged file is an error (and removed when owned)."""
        manifest = self.manifest()
        entry = manifest["layers"].get(str(layer))
        if entry is None:
            return None
        fields = {"module": str, "file": str, "sha256": str, "tokens": int}
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), t) for k, t in fields.items()):
            raise UserError(
                f"statistics manifest {self.dir / 'manifest.json'} is damaged (layer {layer}'s entry); "
                + ("delete the directory and recompute" if self.owned else "copy it again or recompute it")
            )
        if entry["module"] != module:
            raise UserError(
                f"statistics of layer {layer} in {self.dir} are for module {entry['module']}, not {module}"
                + (f"; delete {self.dir}" if self.owned else "")
            )
        path = contained(self.dir, entry.get("file"), self.dir / "manifest.json")
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
            raise UserError(
                f"statistics file {path} {problem}; it has been removed: run `python train.py stage=stats` "
                "with the same settings to recompute it"
            )
        if problem:
            raise UserError(
                f"statistics file {path} {problem}; copy it again from where it came from, or recompute it "
                "with stage=stats"
            )
        second_moment = tensors.get("second_moment")
        if second_moment is None or second_moment.dim() != 2 or second_moment.shape[0] != second_moment.shape[1]:
            raise UserError(f"statistics file {path} holds no square second_moment; copy it again or recompute it")
        return LayerStats(
            layer, module, second_moment, int(entry["tokens"]), path, int(manifest["key"].get("tokens", 0))
        )

    def _drop(self, layer: int) -> None:
        manifest = self.manifest()
        entry = manifest["layers"].pop(str(layer), None)
        write_json(self.dir / "manifest.json", manifest)
        if entry:
            contained(self.dir, entry.get("file"), self.dir / "manifest.json").unlink(missing_ok=True)

    def save(
        self, layer: int, module: str, total: torch.Tensor, count: int, in_place: bool = False, **record: Any
    ) -> LayerStats:
        """Write C = total / count for ``layer`` (file first, then the manifest that points at it) and return it
        as ``load`` would (the caller needs no second read); ``record`` adds JSON fields to the layer's manifest
        entry (the convergence curve, a shortfall). C is divided where ``total`` lies (on a GPU: before the copy
        to the host); ``in_place``: the caller gives ``total`` up and it is divided in place, so no second d x d
        buffer is made (at a 7B model's d_ff, 1.6 GB and 1-2 s of allocation on the host, measured on a CPU)."""
        if count <= 0:
            raise UserError("no tokens were read; check data.files / data.text_field")
        path = self.dir / f"layer_{layer}.safetensors"
        ensure_free_space(self.dir, total.numel() * total.element_size(), f"statistics of layer {layer}")
        in_place = in_place and not total.is_inference()  # an inference tensor cannot change outside that mode
        second_moment = (total.div_(count) if in_place else total / count).cpu().contiguous()
        digest = write_tensors(
            path,
            {"second_moment": second_moment, "count": torch.tensor([count])},
            metadata={"module": module, "layer": str(layer)},
        )
        manifest = self.manifest()
        manifest["layers"][str(layer)] = {
            "module": module,
            "file": path.name,
            "sha256": digest,
            "tokens": count,
            "d_ff": int(total.shape[0]),
            "dtype": str(total.dtype).removeprefix("torch."),
            **record,
        }
        write_json(self.dir / "manifest.json", manifest)
        return LayerStats(layer, module, second_moment, count, path, int(manifest["key"].get("tokens", 0)))


class StatsCache:
    """The cache's layout: ``root/<model>-<key digest>/``, one ``StatsEntry`` per ``StatsKey``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: StatsKey) -> Path:
        return self.root / f"{slug(key.model['name'])}-{key.digest()}"

    def entry(self, key: StatsKey) -> StatsEntry:
        return StatsEntry(self.entry_dir(key), key)

    def load(self, key: StatsKey, layer: int, module: str) -> LayerStats | None:
        """The cached statistics for ``layer``, None when absent; corrupt files are removed loudly."""
        return self.entry(key).load(layer, module)

    def save(self, key: StatsKey, layer: int, module: str, total: torch.Tensor, count: int, **record: Any) -> Path:
        """``StatsEntry.save`` into the key's entry; the file written."""
        return self.entry(key).save(layer, module, total, count, **record).path


# -- the configuration's statistics ------------------------------------------------------------------------


def text_source(cfg: DictConfig) -> TextSource:
    d = cfg.data
    return TextSource(
        path=d.path, name=d.name, split=d.split, revision=d.revision, files=d.files, text_field=d.text_field
    )


def stats_key(cfg: DictConfig, loaded: LoadedModel) -> StatsKey:
    """The key of the statistics ``cfg`` asks for (its values were checked when it was composed). Reads the
    data's identity: a content hash of every local data file, so a run builds its key once."""
    return StatsKey(
        model=loaded.identity,
        model_dtype=cfg.model.dtype,
        dataset=text_source(cfg).identity(),
        max_length=int(cfg.data.max_length),
        tokens=int(cfg.stats.tokens),
        dtype=str(cfg.stats.dtype),
        product=str(cfg.stats.product),
    )


def accumulation_dtype(cfg: DictConfig) -> torch.dtype:
    """``stats.dtype``: the running total's dtype."""
    return _ACCUMULATION_DTYPES[str(cfg.stats.dtype)]


def batch_tokens(cfg: DictConfig, device_type: str) -> int:
    """``data.batch_tokens``, or with ``auto`` the default for the device the statistics run on
    (``data.batch_tokens_by_device``: a CPU runs best on small batches, a GPU needs large ones)."""
    value = cfg.data.batch_tokens
    if value == "auto":
        by_device = cfg.data.batch_tokens_by_device
        value = by_device.get(device_type, by_device.get("cuda"))
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"data.batch_tokens={cfg.data.batch_tokens} must be a positive number of tokens or auto")
    return value


def check_layers(layers: Iterable[Any] | None, loaded: LoadedModel) -> list[int]:
    layers = list(layers) if layers is not None else None
    if not layers:
        raise UserError(
            "stats.layers is empty: name the layers to collect, e.g. stats.layers=[6] (the default is "
            "the model's edit layer)"
        )
    if any(layer is None for layer in layers):
        raise UserError(
            "stats.layers names the model's edit layer, and this model has none (no file in "
            "configs/model/ sets it); pass stats.layers=[N]"
        )
    return sorted({loaded.spec.check_layer(loaded.model, layer, "stats.layers") for layer in layers})


class StatsStore:
    """The statistics cache as one run sees it: the entry its configuration's key names (in ``stats.dir``,
    default ``<cache root>/stats``) and the layers of its model, looked up and saved by layer number."""

    def __init__(self, cache: StatsCache, key: StatsKey, loaded: LoadedModel) -> None:
        self.cache, self.key, self.loaded = cache, key, loaded
        self.entry = cache.entry(key)

    @classmethod
    def configured(cls, cfg: DictConfig, loaded: LoadedModel) -> StatsStore:
        return cls(StatsCache(cfg.stats.dir or cache_root(cfg) / "stats"), stats_key(cfg, loaded), loaded)

    @property
    def dir(self) -> Path:
        return self.entry.dir

    def module(self, layer: int) -> str:
        return self.loaded.spec.down_proj_name(layer)

    def lookup(self, layers: Iterable[int]) -> dict[int, LayerStats | None]:
        """The cached statistics of each layer (checked, sorted), None where they are still to be computed."""
        return {layer: self.entry.load(layer, self.module(layer)) for layer in check_layers(layers, self.loaded)}

    def save(self, layer: int, total: torch.Tensor, count: int, in_place: bool = False, **record: Any) -> LayerStats:
        return self.entry.save(layer, self.module(layer), total, count, in_place, **record)


# -- statistics as an edit uses them ---------------------------------------------------------------------


def load_explicit(directory: str | Path, loaded: LoadedModel, layer: int) -> LayerStats:
    """The statistics of ``layer`` in a directory the stats stage wrote (``edit.stats=DIR``), wherever it
    is now: the cache's own, a copy, an unpacked archive, a shared read-only one. Its manifest says what it
    holds and its checksums are verified; nothing in it is modified."""
    directory = Path(directory).expanduser()
    label = f"edit.stats={directory}"
    if not directory.is_dir():
        raise UserError(
            f"{label} is not a directory; point it at a directory the stats stage wrote (its output names it)"
        )
    entry = StatsEntry(directory, owned=False, label=label)
    key = entry.stats_key()
    if key.model != loaded.identity:
        raise UserError(
            f"statistics in {directory} are for model {key.model.get('name')} "
            f"({key.model.get('revision')}), not {loaded.identity['name']} "
            f"({loaded.identity['revision']}); run stage=stats for this model"
        )
    stats = entry.load(layer, loaded.spec.down_proj_name(layer))
    if stats is None:
        have = ", ".join(map(str, entry.layers())) or "none"
        raise UserError(
            f"{label} has no statistics for layer {layer} (it has layers: {have}); run stage=stats "
            f"stats.layers=[{layer}] or pick the edit layer it has"
        )
    return stats


def largest_cached(cfg: DictConfig, loaded: LoadedModel, layer: int) -> LayerStats | None:
    """The statistics of ``layer`` with the most tokens among the cache's entries (``stats.dir``) for this
    model in ``model.dtype``, whatever text and budget they were made from; None when the cache holds none.
    For a caller that names no data (the Python API without ``data_files``): the statistics the stats stage
    made for this model are the ones it means."""
    root = Path(cfg.stats.dir or cache_root(cfg) / "stats")
    found = []
    for path in sorted(root.glob("*/manifest.json")):
        try:
            manifest = json.loads(path.read_text())
            key, tokens = manifest["key"], int(manifest["layers"][str(layer)]["tokens"])
        except (OSError, ValueError, KeyError, TypeError):  # not an entry for this layer (or damaged): not a candidate
            continue
        if key.get("model") == loaded.identity and key.get("model_dtype") == str(cfg.model.dtype):
            found.append((tokens, path.parent))
    if not found:
        return None
    _, directory = max(found)
    return StatsEntry(directory, label=f"statistics {directory}").load(layer, loaded.spec.down_proj_name(layer))


def stats_identity(stats: LayerStats) -> dict[str, Any]:
    """What an edit records about the statistics it used."""
    return {"file": str(stats.path), "tokens": stats.count}


def shortfall_warning(stats: Iterable[LayerStats]) -> str | None:
    """One line when the data ran out before the statistics' token budget, else None."""
    short = [s for s in stats if s.shortfall]
    if not short:
        return None
    s = short[0]
    layers = ", ".join(str(x.layer) for x in short)
    return (
        f"warning: the statistics of layer{'s' if len(short) > 1 else ''} {layers} hold {s.count:,} tokens, "
        f"{s.shortfall:,} short of stats.tokens={s.requested:,} (the data ran out): C may be poorly estimated; "
        f"give more text with data.files=... (or set stats.tokens={s.count} to what the data hold)"
    )
