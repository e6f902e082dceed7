"""A LightningDataModule that streams text to every rank and dataloader worker, each text to exactly one.

Global shard s = rank * workers + worker.  Each shard reads its own slice of the stream
(``TextSource.open``), has its own token budget (``shard_budget``) and resumes from its own position,
so a restarted run re-reads exactly the texts that were not yet counted.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.text import TextSource, pack_batches, shard_budget

# shard -> (texts consumed, tokens counted) of a partial run
ResumeState = Mapping[int, tuple[int, int]]


class ShardedTokenStream(IterableDataset):
    def __init__(self, source: TextSource, tokenizer, *, max_length: int, chars_per_token: int, batch_tokens: int,
                 tokens: int, rank: int, world_size: int, resume: ResumeState) -> None:
        self.source, self.tokenizer = source, tokenizer
        self.max_length, self.chars_per_token = max_length, chars_per_token
        self.batch_tokens, self.tokens = batch_tokens, tokens
        self.rank, self.world_size, self.resume = rank, world_size, dict(resume)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        num_shards, shard = self.world_size * workers, self.rank * workers + worker
        position, done = self.resume.get(shard, (0, 0))
        budget = shard_budget(self.tokens, shard, num_shards) - done
        texts = self.source.open(shard, num_shards, skip=position)
        for batch in pack_batches(texts, self.tokenizer, max_length=self.max_length, chars_per_token=self.chars_per_token,
                                  batch_tokens=self.batch_tokens, budget=budget, position=position):
            yield {**batch.as_dict(), "shard": shard}


class TextDataModule(L.LightningDataModule):
    """Streams ``source`` for ``trainer.predict``; ``resume(rank)`` gives a partial run's shard positions."""

    def __init__(self, source: TextSource, tokenizer, *, max_length: int, chars_per_token: int, batch_tokens: int,
                 tokens: int, num_workers: int = 1, resume: Callable[[int], ResumeState] | None = None) -> None:
        super().__init__()
        self.source, self.tokenizer = source, tokenizer
        self.max_length, self.chars_per_token = max_length, chars_per_token
        self.batch_tokens, self.tokens = batch_tokens, tokens
        self.num_workers, self.resume = num_workers, resume

    def prepare_data(self) -> None:
        self.source.validate()

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        stream = ShardedTokenStream(
            self.source, self.tokenizer, max_length=self.max_length, chars_per_token=self.chars_per_token,
            batch_tokens=self.batch_tokens,
            tokens=self.tokens, rank=rank, world_size=world, resume=self.resume(rank) if self.resume else {},
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          prefetch_factor=4 if self.num_workers else None)
