"""Recipe: ``python train.py stage=stats`` -- C = E[k k^T] for every layer in ``stats.layers``.

1. load the model and check the request (layers, budget, data);
2. look the statistics up in the cache; stop if every layer is there;
3. stream the text through ``trainer.predict`` with ``SecondMomentModule`` (resuming a partial run);
4. rank 0 writes one safetensors file per layer and the manifest, then removes the partial state.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from datamodules import TextDataModule
from modules.progress import TokenProgressBar
from modules.second_moment import PartialStats, SecondMomentModule
from pipeline.errors import UserError
from pipeline.loading import LoadedModel, default_cache_dir, resolve_dtype
from pipeline.second_moment import LayerStats, StatsCache, StatsKey
from pipeline.text import TextSource

from .common import loaded_model, trainer

log = logging.getLogger(__name__)


def text_source(cfg: DictConfig) -> TextSource:
    d = cfg.data
    return TextSource(path=d.path, name=d.name, split=d.split, revision=d.revision, files=d.files, text_field=d.text_field)


def stats_cache(cfg: DictConfig) -> StatsCache:
    root = cfg.stats.dir or Path(cfg.model.cache_dir or default_cache_dir()) / "stats"
    return StatsCache(root)


def stats_key(cfg: DictConfig, loaded: LoadedModel) -> StatsKey:
    if cfg.stats.tokens is None or int(cfg.stats.tokens) <= 0:
        raise UserError(f"stats.tokens={cfg.stats.tokens} must be a positive token budget (e.g. stats.tokens=200000)")
    resolve_dtype(cfg.stats.dtype)
    return StatsKey(model=loaded.identity, model_dtype=cfg.model.dtype, dataset=text_source(cfg).identity(),
                    max_length=int(cfg.data.max_length), tokens=int(cfg.stats.tokens), dtype=cfg.stats.dtype)


def check_layers(layers, loaded: LoadedModel) -> list[int]:
    if layers is None or any(l is None for l in layers):
        raise UserError("no layer given and this model has no default edit layer; pass stats.layers=[N]")
    return sorted({loaded.spec.check_layer(loaded.model, l, "stats.layers") for l in layers})


def collect(cfg: DictConfig, loaded: LoadedModel, layers: list[int]) -> dict[int, LayerStats]:
    """The statistics of ``layers``, computed (and cached) for those not in the cache yet."""
    layers = check_layers(layers, loaded)
    key, cache = stats_key(cfg, loaded), stats_cache(cfg)
    spec = loaded.spec
    missing = [l for l in layers if cache.load(key, l, spec.down_proj_name(l)) is None]
    if missing:
        _compute(cfg, loaded, key, cache, missing)
    return {l: cache.load(key, l, spec.down_proj_name(l)) for l in layers}


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
                          batch_tokens=int(cfg.data.batch_tokens), tokens=int(cfg.stats.tokens),
                          num_workers=int(cfg.data.num_workers), resume=partial.shards)
    tr = trainer(cfg, enable_progress_bar=False, use_distributed_sampler=False, inference_mode=True,
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


def run(cfg: DictConfig) -> dict[int, LayerStats]:
    torch.manual_seed(cfg.seed)
    loaded = loaded_model(cfg, device="cpu")  # the Trainer moves it to each rank's device
    stats = collect(cfg, loaded, list(cfg.stats.layers))
    for l, s in stats.items():
        _print_path(l, s)
    return stats


@rank_zero_only
def _print_path(layer: int, s: LayerStats) -> None:
    print(f"layer {layer} ({s.module}): C {tuple(s.second_moment.shape)} over {s.count} tokens -> {s.path}")
