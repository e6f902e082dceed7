"""The one place a Lightning Trainer is built from ``cfg.trainer``, with the project's quiet defaults."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig

__all__ = ["make_trainer"]


def make_trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` (no logger, no checkpoints, no model summary unless asked)."""
    t = cfg.trainer
    defaults = dict(logger=False, enable_checkpointing=False, enable_model_summary=False,
                    accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes)
    return L.Trainer(**{**defaults, **kwargs})
