"""A LightningDataModule that streams text to every rank and dataloader worker, each text to exactly one.

Global shard s = rank * workers + worker. The text is cut into windows of ``sort_window`` consecutive texts
that do not depend on the number of shards (``TextSource.windows``: window w goes to shard w % shards).
The token budget is the stream's first ``tokens`` tokens whatever the number of shards: with several, rank 0
counts the windows' tokens up to it once (``plan_stream``, with its dataloader workers) and every rank gets
that plan, so each shard's budget is its windows' part of that prefix. Each shard sorts and packs its
windows into batches in its worker (``pack_batches``) and resumes from its own position (window, batches of
it done, tokens), so a restarted run re-reads exactly the texts that were not yet counted, into the same
batches; 1 worker, 2 workers and 2 ranks sum the same per-batch products.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rome.pipeline.stats.text import StreamPlan, TextSource, feeding_worker_init, pack_batches, plan_stream

# shard -> {"window": windows done, "batches": batches of that window done, "before": tokens of the windows
# done, "tokens": tokens counted} of a partial run
ResumeState = Mapping[int, Mapping[str, int]]


class ShardedTokenStream(IterableDataset):
    def __init__(
        self,
        source: TextSource,
        tokenizer: Any,
        *,
        max_length: int,
        chars_per_token: int,
        batch_tokens: int,
        sort_window: int,
        tokens: int,
        rank: int,
        world_size: int,
        resume: ResumeState,
        plan: StreamPlan | None = None,
    ) -> None:
        """``tokens``: the budget of the whole run; ``plan``: where it ends in the stream (``plan_stream``),
        needed when the run has several shards (ranks x workers)."""
        self.source, self.tokenizer = source, tokenizer
        self.max_length, self.chars_per_token = max_length, chars_per_token
        self.batch_tokens, self.sort_window, self.tokens = batch_tokens, sort_window, tokens
        self.rank, self.world_size, self.resume, self.plan = rank, world_size, dict(resume), plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        num_shards, shard = self.world_size * workers, self.rank * workers + worker
        if self.plan is None and num_shards > 1:
            raise RuntimeError("several shards share the text: their budgets come from plan_stream (plan=)")
        state = self.resume.get(shard, {"window": 0, "batches": 0, "before": 0, "tokens": 0})
        budget = (self.plan.budget(shard, num_shards) if self.plan else self.tokens) - state["before"]
        windows = self.source.windows(self.sort_window, shard, num_shards, skip=state["window"])
        for batch in pack_batches(
            windows,
            self.tokenizer,
            max_length=self.max_length,
            chars_per_token=self.chars_per_token,
            batch_tokens=self.batch_tokens,
            budget=budget,
            window=state["window"],
            skip_batches=state["batches"],
        ):
            yield {**batch.as_dict(), "shard": shard}


class TextDataModule(L.LightningDataModule):
    """Streams ``source`` for ``trainer.predict``; ``resume(rank)`` gives a partial run's shard positions.
    On CUDA the batches come in pinned memory (the Trainer copies them with ``non_blocking``)."""

    def __init__(
        self,
        source: TextSource,
        tokenizer: Any,
        *,
        max_length: int,
        chars_per_token: int,
        batch_tokens: int,
        sort_window: int,
        tokens: int,
        num_workers: int,
        resume: Callable[[int], ResumeState] | None = None,
    ) -> None:
        super().__init__()
        self.source, self.tokenizer = source, tokenizer
        self.max_length, self.chars_per_token = max_length, chars_per_token
        self.batch_tokens, self.sort_window, self.tokens = batch_tokens, sort_window, tokens
        self.num_workers, self.resume = num_workers, resume

    def prepare_data(self) -> None:
        self.source.validate()

    def plan(self) -> StreamPlan | None:
        """Where the budget ends in the stream, when several shards share it (None: one shard, whose budget
        is the whole one). Counted on rank 0, with its dataloader workers, and sent to the other ranks."""
        if self.trainer.world_size * max(self.num_workers, 1) == 1:
            return None
        plan = None
        if self.trainer.is_global_zero:
            plan = plan_stream(
                self.source,
                self.tokenizer,
                sort_window=self.sort_window,
                max_length=self.max_length,
                chars_per_token=self.chars_per_token,
                budget=self.tokens,
                workers=self.num_workers,
            )
        return self.trainer.strategy.broadcast(plan, src=0)

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        stream = ShardedTokenStream(
            self.source,
            self.tokenizer,
            max_length=self.max_length,
            chars_per_token=self.chars_per_token,
            batch_tokens=self.batch_tokens,
            sort_window=self.sort_window,
            tokens=self.tokens,
            rank=rank,
            world_size=world,
            resume=self.resume(rank) if self.resume else {},
            plan=self.plan(),
        )
        workers = self.num_workers
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=self.trainer.strategy.root_device.type == "cuda",
            worker_init_fn=feeding_worker_init if workers else None,
        )
