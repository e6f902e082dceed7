"""Small pieces every recipe shares: loading the configured model, seeding, the Lightning Trainer."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from pipeline.loading import LoadedModel, load_model


def loaded_model(cfg: DictConfig, device: str | None = None) -> LoadedModel:
    m = cfg.model
    arch = OmegaConf.to_container(m.arch, resolve=True) if m.arch is not None else None
    return load_model(m.name, dtype=m.dtype, device=device or m.device, revision=m.revision,
                      cache_dir=m.cache_dir, arch=arch)


def trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` with the project's quiet defaults (no logger, no checkpoints)."""
    t = cfg.trainer
    defaults = dict(logger=False, enable_checkpointing=False, enable_model_summary=False)
    return L.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
                     **{**defaults, **kwargs})
