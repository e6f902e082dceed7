"""Which statistics a run needs and where they are: the cache key from the configuration, the lookup,
an explicit statistics directory (``edit.stats=DIR``) and what an edit is told about short statistics.
Computing missing statistics needs a Trainer and lives in ``modules/statistics.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig

from pipeline.core.loading import cache_root
from pipeline.errors import UserError
from pipeline.core.loading import LoadedModel
from pipeline.stats.second_moment import PRODUCTS, LayerStats, StatsCache, StatsEntry, StatsKey
from pipeline.stats.text import TextSource

__all__ = ["text_source", "stats_cache", "stats_key", "accumulation_dtype", "batch_tokens", "check_layers", "lookup",
           "load_explicit", "stats_identity", "shortfall_warning"]

_ACCUMULATION_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def text_source(cfg: DictConfig) -> TextSource:
    d = cfg.data
    return TextSource(path=d.path, name=d.name, split=d.split, revision=d.revision, files=d.files, text_field=d.text_field)


def stats_cache(cfg: DictConfig) -> StatsCache:
    return StatsCache(cfg.stats.dir or cache_root(cfg) / "stats")


def accumulation_dtype(cfg: DictConfig) -> torch.dtype:
    """``stats.dtype``: the running total's dtype."""
    if str(cfg.stats.dtype) not in _ACCUMULATION_DTYPES:
        raise UserError(f"stats.dtype={cfg.stats.dtype} is not one of {', '.join(_ACCUMULATION_DTYPES)} "
                        "(the dtype of the running total; float64 is the default)")
    return _ACCUMULATION_DTYPES[str(cfg.stats.dtype)]


def stats_key(cfg: DictConfig, loaded: LoadedModel) -> StatsKey:
    tokens = cfg.stats.tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise UserError(f"stats.tokens={tokens} must be a positive token budget (e.g. stats.tokens=200000)")
    accumulation_dtype(cfg)
    if cfg.stats.product not in PRODUCTS:
        raise UserError(f"stats.product={cfg.stats.product} is not one of {', '.join(PRODUCTS)} "
                        "(fp32: float32 per-batch products into the total, the fast path; exact: all in stats.dtype)")
    return StatsKey(model=loaded.identity, model_dtype=cfg.model.dtype, dataset=text_source(cfg).identity(),
                    max_length=int(cfg.data.max_length), tokens=int(tokens), dtype=cfg.stats.dtype,
                    product=cfg.stats.product)


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
    if not layers or any(l is None for l in layers):
        raise UserError("no layer given and this model has no default edit layer; pass stats.layers=[N]")
    return sorted({loaded.spec.check_layer(loaded.model, l, "stats.layers") for l in layers})


def lookup(cfg: DictConfig, loaded: LoadedModel, layers: Iterable[int]) -> dict[int, LayerStats | None]:
    """The cached statistics of each layer, None where they are still to be computed."""
    key, cache = stats_key(cfg, loaded), stats_cache(cfg)
    return {l: cache.load(key, l, loaded.spec.down_proj_name(l)) for l in check_layers(layers, loaded)}


def load_explicit(directory: str | Path, loaded: LoadedModel, layer: int) -> LayerStats:
    """The statistics of ``layer`` in a directory the stats stage wrote (``edit.stats=DIR``), wherever it
    is now: the cache's own, a copy, an unpacked archive, a shared read-only one. Its manifest says what it
    holds and its checksums are verified; nothing in it is modified."""
    directory = Path(directory).expanduser()
    label = f"edit.stats={directory}"
    if not directory.is_dir():
        raise UserError(f"{label} is not a directory; point it at a directory the stats stage wrote (its output names it)")
    entry = StatsEntry(directory, owned=False, label=label)
    key = entry.stats_key()
    if key.model != loaded.identity:
        raise UserError(f"statistics in {directory} are for model {key.model.get('name')} ({key.model.get('revision')}), "
                        f"not {loaded.identity['name']} ({loaded.identity['revision']}); run stage=stats for this model")
    stats = entry.load(layer, loaded.spec.down_proj_name(layer))
    if stats is None:
        have = ", ".join(map(str, entry.layers())) or "none"
        raise UserError(f"{label} has no statistics for layer {layer} (it has layers: {have}); run stage=stats "
                        f"stats.layers=[{layer}] or pick the edit layer it has")
    return stats


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
    return (f"warning: the statistics of layer{'s' if len(short) > 1 else ''} {layers} hold {s.count:,} tokens, "
            f"{s.shortfall:,} short of stats.tokens={s.requested:,} (the data ran out): C may be poorly estimated; "
            f"give more text with data.files=... (or set stats.tokens={s.count} to what the data hold)")
