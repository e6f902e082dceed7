"""Recipe: ``python train.py stage=stats`` -- C = E[k k^T] for every layer in ``stats.layers``.

1. load the model and check the request (layers, budget, data);
2. look the statistics up in the store (``pipeline.stats.store``); stop if every layer is there;
3. stream the text through ``trainer.predict`` with ``SecondMomentModule`` (resuming a partial run; on
   SIGTERM / SIGINT the batch in flight is finished, the partial state saved, and the run stops);
4. rank 0 writes one safetensors file per layer, the manifest and the convergence plot, then removes the
   partial state.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from modules.statistics import collect
from pipeline.core.loading import load_configured
from pipeline.stats.store import LayerStats


def run(cfg: DictConfig) -> dict[int, LayerStats]:
    torch.manual_seed(cfg.seed)
    loaded = load_configured(cfg.model, device="cpu")  # the stats module moves it to its rank's device
    stats = collect(cfg, loaded, list(cfg.stats.layers))
    for layer, s in stats.items():
        _print_path(layer, s)
    return stats


@rank_zero_only
def _print_path(layer: int, s: LayerStats) -> None:
    print(f"layer {layer} ({s.module}): C {tuple(s.second_moment.shape)} over {s.count} tokens -> {s.path}")
