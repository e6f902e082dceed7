"""Statistics on demand: look C up in the cache, compute what is missing with a Trainer over streamed
text (``SecondMomentModule`` + ``TextDataModule``), and hand C to the edit stage or the eval methods."""

from __future__ import annotations

import time
from typing import Iterable

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from datamodules import TextDataModule
from pipeline.core.loading import LoadedModel
from pipeline.stats.second_moment import LayerStats, StatsCache, StatsKey
from pipeline.stats.store import (accumulation_dtype, batch_tokens, load_explicit, lookup, shortfall_warning,
                                 stats_cache, stats_identity, stats_key, text_source)
from pipeline.stats.convergence import plot_convergence

from .progress import TokenProgressBar
from .second_moment import ConvergenceSettings, PartialStats, SecondMomentModule
from .trainer import make_trainer

__all__ = ["collect", "second_moment"]


def collect(cfg: DictConfig, loaded: LoadedModel, layers: list[int], *,
            timings: dict[str, float] | None = None) -> dict[int, LayerStats]:
    """The statistics of ``layers``, computed (and cached) for those not in the cache yet. Statistics the
    data could not fill are used with a one-line warning. ``timings``, when given, receives the seconds of
    the streaming pass (``"pass"``: the Trainer's predict, from launch to the merged sums), if one ran."""
    found = lookup(cfg, loaded, layers)
    missing = [l for l, s in found.items() if s is None]
    if missing:
        seconds = _compute(cfg, loaded, stats_key(cfg, loaded), stats_cache(cfg), missing)
        if timings is not None:
            timings["pass"] = seconds
        found = lookup(cfg, loaded, found)
    _warn_short(found.values())
    return found


def second_moment(cfg: DictConfig, loaded: LoadedModel, layer: int) -> tuple[torch.Tensor | None, dict | None]:
    """C of ``layer`` and the identity of the statistics it came from; (None, None) for C = I."""
    if not cfg.edit.mom2_adjustment:
        return None, None
    if cfg.edit.stats:
        stats = load_explicit(cfg.edit.stats, loaded, layer)
        _warn_short([stats])
    else:
        stats = collect(cfg, loaded, [layer])[layer]
    return stats.second_moment, stats_identity(stats)


@rank_zero_only
def _warn_short(stats: Iterable[LayerStats]) -> None:
    line = shortfall_warning(stats)
    if line:
        print(line)


def _compute(cfg: DictConfig, loaded: LoadedModel, key: StatsKey, cache: StatsCache, layers: list[int]) -> float:
    source = text_source(cfg)
    source.validate()
    entry = cache.entry(key)
    partial_dir = entry.dir / "partial"
    # Lightning's SLURM requeue (SIGUSR1) writes its checkpoint into default_root_dir: next to our state
    tr = make_trainer(cfg, enable_progress_bar=False, use_distributed_sampler=False, inference_mode=True,
                      default_root_dir=str(partial_dir), callbacks=[TokenProgressBar(int(cfg.stats.tokens))])
    tokens_per_batch = batch_tokens(cfg, tr.strategy.root_device.type)
    run = {"format": 2, "key": key.digest(), "layers": layers, "devices": str(cfg.trainer.devices),
           "num_nodes": int(cfg.trainer.num_nodes), "num_workers": int(cfg.data.num_workers),
           "batch_tokens": tokens_per_batch, "sort_window": int(cfg.data.sort_window)}
    partial = PartialStats(partial_dir, run)
    conv = cfg.stats.convergence
    module = SecondMomentModule(
        loaded.model, loaded.spec, layers, dtype=accumulation_dtype(cfg), product=str(cfg.stats.product),
        partial=partial, checkpoint_minutes=float(cfg.stats.checkpoint_minutes or 0),
        checkpoint_every_batches=int(cfg.stats.checkpoint_every_batches or 0),
        convergence=ConvergenceSettings(int(conv.probes), int(conv.first_tokens), float(conv.threshold), int(cfg.seed))
        if conv.probes else None)
    data = TextDataModule(source, loaded.tokenizer, max_length=int(cfg.data.max_length),
                          chars_per_token=int(cfg.data.chars_per_token), batch_tokens=tokens_per_batch,
                          sort_window=int(cfg.data.sort_window), tokens=int(cfg.stats.tokens),
                          num_workers=int(cfg.data.num_workers), resume=partial.shards)
    start = time.perf_counter()
    tr.predict(module, datamodule=data, return_predictions=False)  # a stop request ends it with Interrupted
    seconds = time.perf_counter() - start
    if tr.is_global_zero:
        requested = int(cfg.stats.tokens)
        plotted = module.convergence is not None and any(module.curves.values())
        if plotted:
            label = "tokens" if tr.world_size == 1 else f"tokens of rank 0 (of {tr.world_size} ranks)"
            plot_convergence(module.curves, entry.dir / "convergence", title=f"{loaded.identity['name']}: convergence of C",
                             threshold=float(conv.threshold), tokens_label=label)
        for l in layers:
            record = {"data_ran_out": True, "shortfall": requested - module.count} if module.count < requested else {}
            if module.convergence:
                record["convergence"] = {"points": module.curves[l], "ranks": tr.world_size,
                                         "threshold": float(conv.threshold), "plot": "convergence.png" if plotted else None}
            entry.save(l, loaded.spec.down_proj_name(l), module.sums[l].cpu(), module.count, **record)
        partial.clear()
        _report(module.count, seconds, module.count - module.resumed)
    tr.strategy.barrier()
    if tr.world_size > 1 and not tr.is_global_zero:
        raise SystemExit(0)  # only rank 0 goes on to report (and to any later stage)
    return seconds


@rank_zero_only
def _report(tokens: int, seconds: float, new_tokens: int) -> None:
    print(f"stats: {tokens} tokens in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):.0f} tokens/s)")
