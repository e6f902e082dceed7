"""Recipe: ``python train.py stage=stats`` -- C = E[k k^T] for every layer in ``stats.layers``.

1. load the model and check the request (layers, budget, data);
2. look the statistics up in the store (``pipeline.stats.store``); stop if every layer is there;
3. stream the text through ``trainer.predict`` with ``SecondMomentModule`` (resuming a partial run; on
   SIGTERM / SIGINT the batch in flight is finished, the partial state saved, and the run stops);
4. rank 0 writes one safetensors file per layer, the manifest and the convergence plot, then removes the
   partial state;
5. print, per layer, where C is and whether its token budget converged (the manifest's convergence readout:
   ``pipeline.stats.convergence.budget_verdict``), and where ``convergence.png`` is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from rome.modules.statistics import collect
from rome.pipeline.core.loading import load_configured
from rome.pipeline.stats.convergence import budget_verdict
from rome.pipeline.stats.store import LayerStats, StatsEntry


def run(cfg: DictConfig) -> dict[int, LayerStats]:
    torch.manual_seed(cfg.seed)
    loaded = load_configured(cfg.model, device="cpu")  # the stats module moves it to its rank's device
    stats = collect(cfg, loaded, list(cfg.stats.layers))
    _report(stats)
    return stats


@rank_zero_only
def _report(stats: dict[int, LayerStats]) -> None:
    plots: list[Path] = []
    for layer, s in stats.items():
        print(f"layer {layer} ({s.module}): C {tuple(s.second_moment.shape)} over {s.count} tokens -> {s.path}")
        entry = StatsEntry(s.path.parent, owned=False).manifest()["layers"].get(str(layer), {})
        record = entry.get("convergence")
        _, verdict = budget_verdict(record)
        print(f"  token budget: {verdict}")
        plot = s.path.parent / record["plot"] if record and record.get("plot") else None
        if plot is not None and plot.is_file() and plot not in plots:
            plots.append(plot)
    for plot in plots:
        print(f"convergence plot (change of C and of u per doubling of the tokens): {plot}")
