"""Case indices for ``trainer.predict``, sharded over ranks without padding.

Lightning's DistributedSampler pads the last shard with repeated samples, which would score a case twice
(so the Trainer runs with ``use_distributed_sampler=False``). Here rank r takes positions r, r + W, ... of
the pending list; a rank left with nothing gets one no-op item (``NO_CASE``) so that every rank runs the
predict loop and its hooks (gathering the metrics needs every rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

NO_CASE = -1


def shard(pending: Sequence[int], rank: int, world_size: int) -> list[int]:
    return list(pending[rank::world_size]) or [NO_CASE]


class CaseDataModule(L.LightningDataModule):
    def __init__(self, pending: Sequence[int]) -> None:
        super().__init__()
        self.pending = list(pending)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(shard(self.pending, self.trainer.global_rank, self.trainer.world_size), batch_size=None)
