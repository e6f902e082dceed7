"""The one place a Lightning Trainer is built from ``cfg.trainer``, with the project's quiet defaults."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig

from rome.pipeline.core.timing import model_device

__all__ = ["make_trainer", "single_device_trainer"]


def make_trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` (no logger, no checkpoints, no model summary unless asked)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from rome.pipeline.errors import UserError

    t = cfg.trainer
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
    )
    try:
        return L.Trainer(**{**defaults, **kwargs})
    except (MisconfigurationException, ValueError, TypeError) as err:  # e.g. trainer.devices=4 on a 1-GPU machine
        raise UserError(
            f"trainer.* settings (accelerator={t.accelerator}, devices={t.devices}, strategy={t.strategy}, "
            f"num_nodes={t.num_nodes}): {str(err).splitlines()[0]}"
        ) from None


def single_device_trainer(cfg: DictConfig, model: Any, callbacks: list[L.Callback]) -> L.Trainer:
    """A one-process Trainer on the device ``model`` already sits on (the edit stage's loops: the model is
    never moved, so the Trainer must run where it is), no progress bar of Lightning's own."""
    device = model_device(model)
    cuda = device.type == "cuda"
    return make_trainer(
        cfg,
        max_epochs=1,
        accelerator="gpu" if cuda else "cpu",
        devices=[device.index or 0] if cuda else 1,
        strategy="auto",
        num_nodes=1,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
