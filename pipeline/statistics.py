"""Which statistics a run needs and where they are: the cache key from the configuration, the lookup,
and an explicit statistics directory (``edit.stats=DIR``). Computing missing statistics needs a
Trainer and lives in ``modules/statistics.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig

from .config import cache_root
from .errors import UserError
from .loading import LoadedModel, resolve_dtype
from .second_moment import LayerStats, StatsCache, StatsKey
from .text import TextSource

__all__ = ["text_source", "stats_cache", "stats_key", "check_layers", "lookup", "load_explicit", "stats_identity"]


def text_source(cfg: DictConfig) -> TextSource:
    d = cfg.data
    return TextSource(path=d.path, name=d.name, split=d.split, revision=d.revision, files=d.files, text_field=d.text_field)


def stats_cache(cfg: DictConfig) -> StatsCache:
    return StatsCache(cfg.stats.dir or cache_root(cfg) / "stats")


def stats_key(cfg: DictConfig, loaded: LoadedModel) -> StatsKey:
    if cfg.stats.tokens is None or int(cfg.stats.tokens) <= 0:
        raise UserError(f"stats.tokens={cfg.stats.tokens} must be a positive token budget (e.g. stats.tokens=200000)")
    resolve_dtype(cfg.stats.dtype)
    return StatsKey(model=loaded.identity, model_dtype=cfg.model.dtype, dataset=text_source(cfg).identity(),
                    max_length=int(cfg.data.max_length), tokens=int(cfg.stats.tokens), dtype=cfg.stats.dtype)


def check_layers(layers: Iterable[Any] | None, loaded: LoadedModel) -> list[int]:
    layers = list(layers) if layers is not None else None
    if not layers or any(l is None for l in layers):
        raise UserError("no layer given and this model has no default edit layer; pass stats.layers=[N]")
    return sorted({loaded.spec.check_layer(loaded.model, l, "stats.layers") for l in layers})


def lookup(cfg: DictConfig, loaded: LoadedModel, layers: Iterable[int]) -> dict[int, LayerStats | None]:
    """The cached statistics of each layer, None where they are still to be computed."""
    key, cache = stats_key(cfg, loaded), stats_cache(cfg)
    return {l: cache.load(key, l, loaded.spec.down_proj_name(l)) for l in check_layers(layers, loaded)}


def load_explicit(directory: str | Path, loaded: LoadedModel, layer: int) -> LayerStats:
    """The statistics of ``layer`` in a directory the stats stage wrote (``edit.stats=DIR``)."""
    directory = Path(directory)
    manifest = directory / "manifest.json"
    if not manifest.exists():
        raise UserError(f"edit.stats={directory} has no manifest.json; point it at a directory the stats stage wrote")
    key = json.loads(manifest.read_text())["key"]
    if key["model"] != loaded.identity:
        raise UserError(f"statistics in {directory} are for model {key['model']['name']} ({key['model']['revision']}), "
                        f"not {loaded.identity['name']} ({loaded.identity['revision']}); run stage=stats for this model")
    stats = StatsCache(directory.parent).load(StatsKey(**key), layer, loaded.spec.down_proj_name(layer))
    if stats is None:
        raise UserError(f"edit.stats={directory} has no statistics for layer {layer}")
    return stats


def stats_identity(stats: LayerStats) -> dict[str, Any]:
    """What an edit records about the statistics it used."""
    return {"file": str(stats.path), "tokens": stats.count}
