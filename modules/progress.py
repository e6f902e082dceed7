"""A progress bar in tokens, with tokens/s, for stages that stream text through ``trainer.predict``."""

from __future__ import annotations

from typing import Any

import lightning as L
from tqdm.auto import tqdm


class TokenProgressBar(L.Callback):
    """Counts the tokens of rank 0 against rank 0's share of the budget (other ranks run in step), from the
    tokens a resumed run starts with (``pl_module.count``, loaded in the module's ``setup``)."""

    def __init__(self, total: int, desc: str = "tokens") -> None:
        self.total, self.desc = total, desc
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            share = -(-self.total // trainer.world_size)
            label = self.desc if trainer.world_size == 1 else f"{self.desc} (rank 0 of {trainer.world_size})"
            self.bar = tqdm(
                total=share,
                desc=label,
                unit="tok",
                unit_scale=True,
                dynamic_ncols=True,
                initial=getattr(pl_module, "count", 0),
            )

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.bar is not None:
            self.bar.update(int(batch["tokens"]))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_predict_end(trainer, pl_module)  # end the bar's line: the stop message gets a line of its own
