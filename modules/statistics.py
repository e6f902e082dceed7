"""Statistics on demand: look C up in the store (``pipeline.stats.store``), compute what is missing with a
Trainer over streamed text (``SecondMomentModule`` + ``TextDataModule``) into the store, and hand C to the
edit stage or the eval methods."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from rome.datamodules import TextDataModule
from rome.pipeline.core.atomic import ensure_free_space
from rome.pipeline.core.environment import environment
from rome.pipeline.core.loading import LoadedModel
from rome.pipeline.core.locks import DirectoryLock, first_process
from rome.pipeline.core.outputs import claim_output_dir
from rome.pipeline.core.timing import Clock
from rome.pipeline.stats.convergence import plot_convergence
from rome.pipeline.stats.store import (
    LayerStats,
    StatsStore,
    accumulation_dtype,
    batch_tokens,
    load_explicit,
    shortfall_warning,
    stats_identity,
    text_source,
)

from .progress import TokenProgressBar
from .second_moment import PARTIAL_FORMAT, ConvergenceSettings, PartialStats, SecondMomentModule
from .trainer import make_trainer

__all__ = ["collect", "second_moment", "layer_statistics"]


def collect(
    cfg: DictConfig, loaded: LoadedModel, layers: list[int], *, timings: dict[str, float] | None = None
) -> dict[int, LayerStats]:
    """The statistics of ``layers``, computed (and cached) for those not in the cache yet. Statistics the
    data could not fill are used with a one-line warning. ``timings``, when given, receives the seconds of
    the streaming pass (``"pass"``: the Trainer's predict, from launch to the merged sums), if one ran."""
    store = StatsStore.configured(cfg, loaded)
    found = store.lookup(layers)
    missing = [layer for layer, s in found.items() if s is None]
    if missing:
        first = first_process()  # one run computes a statistics entry at a time; its DDP ranks work under its lock
        if first:  # written into: the statistics directory must be ours (a user's directory is only ever read)
            claim_output_dir(store.dir.parent, "stats.dir", ours=_earlier_statistics)
        with DirectoryLock(store.dir, "stats.dir entry") if first else contextlib.nullcontext():
            computed = _compute(cfg, loaded, store, missing, timings)  # what was written, as a lookup would load it
        found = {layer: s or computed[layer] for layer, s in found.items()}
    _warn_short(found.values())
    return found


def _earlier_statistics(root: Path) -> bool:
    """A statistics directory an earlier version wrote (before the marker): entries with a manifest."""
    return all(p.is_dir() and (p / "manifest.json").exists() or p.name.startswith(".") for p in root.iterdir())


def second_moment(cfg: DictConfig, loaded: LoadedModel, layer: int) -> tuple[torch.Tensor | None, dict | None]:
    """C of ``layer`` and the identity of the statistics it came from; (None, None) for C = I."""
    if not cfg.edit.mom2_adjustment:
        return None, None
    stats = layer_statistics(cfg, loaded)([layer])[layer]
    return stats.second_moment, stats_identity(stats)


def layer_statistics(cfg: DictConfig, loaded: LoadedModel) -> Callable[[Sequence[int]], dict[int, LayerStats]]:
    """The statistics provider editors are built with (``build_editor(..., statistics=)``): C of the layers
    asked for, from ``edit.stats`` when set, else looked up in the cache and computed for those missing (one
    streaming pass for all of them); each layer is read once per provider, however many editors ask."""
    kept: dict[int, LayerStats] = {}

    def provide(layers: Sequence[int]) -> dict[int, LayerStats]:
        missing = [layer for layer in layers if layer not in kept]
        if missing and cfg.edit.stats:
            found = {layer: load_explicit(cfg.edit.stats, loaded, layer) for layer in missing}
            _warn_short(found.values())
            kept.update(found)
        elif missing:
            kept.update(collect(cfg, loaded, missing))
        return {layer: kept[layer] for layer in layers}

    return provide


@rank_zero_only
def _warn_short(stats: Iterable[LayerStats]) -> None:
    line = shortfall_warning(stats)
    if line:
        print(line)


def _compute(
    cfg: DictConfig, loaded: LoadedModel, store: StatsStore, layers: list[int], timings: dict[str, float] | None
) -> dict[int, LayerStats]:
    """One streaming pass for ``layers``, saved into ``store`` by rank 0, which returns them; the other
    ranks exit once rank 0 has written them."""
    source = text_source(cfg)
    source.validate()
    partial_dir = store.dir / "partial"
    # Lightning's SLURM requeue (SIGUSR1) writes its checkpoint into default_root_dir: next to our state
    tr = make_trainer(
        cfg,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        inference_mode=True,
        default_root_dir=str(partial_dir),
        callbacks=[TokenProgressBar(int(cfg.stats.tokens))],
    )
    tokens_per_batch = batch_tokens(cfg, tr.strategy.root_device.type)
    run = {
        "format": PARTIAL_FORMAT,
        "key": store.key.digest(),
        "layers": layers,
        "devices": str(cfg.trainer.devices),
        "num_nodes": int(cfg.trainer.num_nodes),
        "num_workers": int(cfg.data.num_workers),
        "batch_tokens": tokens_per_batch,
        "sort_window": int(cfg.data.sort_window),
    }
    # room for what the pass writes, judged before it: the running sums (checkpoints) and C, per layer
    d_ff = {layer: loaded.spec.key_size(loaded.model, layer) for layer in layers}
    accumulator = torch.tensor([], dtype=accumulation_dtype(cfg)).element_size()
    ensure_free_space(store.dir, sum(2 * d * d * accumulator for d in d_ff.values()), f"statistics of layers {layers}")
    partial = PartialStats(partial_dir, run)
    conv = cfg.stats.convergence
    module = SecondMomentModule(
        loaded.model,
        loaded.spec,
        layers,
        dtype=accumulation_dtype(cfg),
        product=str(cfg.stats.product),
        partial=partial,
        checkpoint_minutes=float(cfg.stats.checkpoint_minutes),
        checkpoint_every_batches=int(cfg.stats.checkpoint_every_batches),
        convergence=ConvergenceSettings(int(conv.probes), int(conv.first_tokens), float(conv.threshold), int(cfg.seed))
        if conv.probes
        else None,
    )
    data = TextDataModule(
        source,
        loaded.tokenizer,
        max_length=int(cfg.data.max_length),
        chars_per_token=int(cfg.data.chars_per_token),
        batch_tokens=tokens_per_batch,
        sort_window=int(cfg.data.sort_window),
        tokens=int(cfg.stats.tokens),
        num_workers=int(cfg.data.num_workers),
        resume=partial.shards,
    )
    # timed on the model's own device, wherever it is (the module moves it to its rank's): a Clock on the
    # Trainer's root device would touch CUDA in this process before a fork-launched strategy starts its ranks
    clock = Clock(loaded.model, timings)
    tr.predict(module, datamodule=data, return_predictions=False)  # a stop request ends it with Interrupted
    seconds = clock.lap("pass")
    saved: dict[int, LayerStats] = {}
    if tr.is_global_zero:
        requested = int(cfg.stats.tokens)
        plotted = module.convergence is not None and any(module.curves.values())
        if plotted:
            label = "tokens" if tr.world_size == 1 else f"tokens of rank 0 (of {tr.world_size} ranks)"
            plot_convergence(
                module.curves,
                store.dir / "convergence",
                title=f"{loaded.identity['name']}: convergence of C",
                threshold=float(conv.threshold),
                tokens_label=label,
            )
        for layer in layers:
            record = {"data_ran_out": True, "shortfall": requested - module.count} if module.count < requested else {}
            record["environment"] = {**environment(module.sums[layer].device), "processes": tr.world_size}
            if module.convergence:
                record["convergence"] = {
                    "points": module.curves[layer],
                    "ranks": tr.world_size,
                    "threshold": float(conv.threshold),
                    "plot": "convergence.png" if plotted else None,
                }
            # the pass is over and its sums are not read again: C is divided in them, on their device
            saved[layer] = store.save(layer, module.sums[layer], module.count, in_place=True, **record)
        partial.clear()
        _report(module.count, seconds, module.count - module.resumed)
    tr.strategy.barrier()
    if tr.world_size > 1 and not tr.is_global_zero:
        raise SystemExit(0)  # only rank 0 goes on to report (and to any later stage)
    return saved


@rank_zero_only
def _report(tokens: int, seconds: float, new_tokens: int) -> None:
    print(f"stats: {tokens} tokens in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):.0f} tokens/s)")
