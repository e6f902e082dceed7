"""Statistics on demand: look C up in the cache, compute what is missing with a Trainer over streamed
text (``SecondMomentModule`` + ``TextDataModule``), and hand C to the edit stage or the eval methods."""

from __future__ import annotations

import logging
import time

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from datamodules import TextDataModule
from pipeline.loading import LoadedModel, resolve_dtype
from pipeline.second_moment import LayerStats, StatsCache, StatsKey
from pipeline.statistics import load_explicit, lookup, stats_cache, stats_identity, stats_key, text_source

from .progress import TokenProgressBar
from .second_moment import PartialStats, SecondMomentModule
from .trainer import make_trainer

__all__ = ["collect", "second_moment"]

log = logging.getLogger(__name__)


def collect(cfg: DictConfig, loaded: LoadedModel, layers: list[int]) -> dict[int, LayerStats]:
    """The statistics of ``layers``, computed (and cached) for those not in the cache yet."""
    found = lookup(cfg, loaded, layers)
    missing = [l for l, s in found.items() if s is None]
    if missing:
        _compute(cfg, loaded, stats_key(cfg, loaded), stats_cache(cfg), missing)
        found = lookup(cfg, loaded, found)
    return found


def second_moment(cfg: DictConfig, loaded: LoadedModel, layer: int) -> tuple[torch.Tensor | None, dict | None]:
    """C of ``layer`` and the identity of the statistics it came from; (None, None) for C = I."""
    if not cfg.edit.mom2_adjustment:
        return None, None
    stats = load_explicit(cfg.edit.stats, loaded, layer) if cfg.edit.stats else collect(cfg, loaded, [layer])[layer]
    return stats.second_moment, stats_identity(stats)


def _compute(cfg: DictConfig, loaded: LoadedModel, key: StatsKey, cache: StatsCache, layers: list[int]) -> None:
    source = text_source(cfg)
    source.validate()
    every = int(cfg.stats.checkpoint_every or 0)
    run = {"key": key.digest(), "layers": layers, "devices": str(cfg.trainer.devices),
           "num_nodes": int(cfg.trainer.num_nodes), "num_workers": int(cfg.data.num_workers),
           "batch_tokens": int(cfg.data.batch_tokens)}
    partial = PartialStats(cache.entry_dir(key) / "partial", run)
    module = SecondMomentModule(loaded.model, loaded.spec, layers, dtype=resolve_dtype(cfg.stats.dtype),
                                partial=partial, checkpoint_every=every)
    data = TextDataModule(source, loaded.tokenizer, max_length=int(cfg.data.max_length),
                          chars_per_token=int(cfg.data.chars_per_token),
                          batch_tokens=int(cfg.data.batch_tokens), tokens=int(cfg.stats.tokens),
                          num_workers=int(cfg.data.num_workers), resume=partial.shards)
    tr = make_trainer(cfg, enable_progress_bar=False, use_distributed_sampler=False, inference_mode=True,
                      callbacks=[TokenProgressBar(int(cfg.stats.tokens))])
    start = time.perf_counter()
    tr.predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    if tr.is_global_zero:
        for l in layers:
            cache.save(key, l, loaded.spec.down_proj_name(l), module.sums[l].cpu(), module.count)
        partial.clear()
        _report(module.count, seconds, module.count - module.resumed, module.count < int(cfg.stats.tokens))
    tr.strategy.barrier()
    if tr.world_size > 1 and not tr.is_global_zero:
        raise SystemExit(0)  # only rank 0 goes on to report (and to any later stage)


@rank_zero_only
def _report(tokens: int, seconds: float, new_tokens: int, short: bool) -> None:
    if short:
        log.warning("the data ran out after %d tokens (fewer than stats.tokens)", tokens)
    print(f"stats: {tokens} tokens in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):.0f} tokens/s)")
