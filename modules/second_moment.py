"""A LightningModule that accumulates sum k k^T over streamed text for several layers in one pass.

Run through ``trainer.predict`` (each rank sees only its own shards, no duplicated samples). The forward
stops right before the deepest requested down-projection: nothing after it can change the keys.
Partial sums, token counts and per-shard data positions are checkpointed atomically every
``checkpoint_every`` batches, one file per rank, and picked up again by the same command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pipeline.arch import ArchSpec
from pipeline.atomic import atomic_path
from pipeline.errors import UserError
from pipeline.hooks import TraceDict
from pipeline.second_moment import accumulate_second_moment


class PartialStats:
    """``dir/rank<r>.pt``: the resumable state of one rank, checked against the run it belongs to."""

    def __init__(self, directory: Path, run: dict[str, Any]) -> None:
        self.dir, self.run = Path(directory), run
        self._cache: dict[int, dict[str, Any] | None] = {}

    def path(self, rank: int) -> Path:
        return self.dir / f"rank{rank}.pt"

    def load(self, rank: int) -> dict[str, Any] | None:
        if rank not in self._cache:
            p = self.path(rank)
            state = None
            if p.exists():
                try:
                    state = torch.load(p, map_location="cpu", weights_only=True)
                except Exception as err:
                    p.unlink()
                    raise UserError(f"partial statistics {p} were corrupt and have been removed; run the command again") from err
                if state["run"] != self.run:
                    raise UserError(f"{self.dir} holds a partial run with other settings ({_diff(state['run'], self.run)}); "
                                    f"rerun with those settings to resume, or delete {self.dir}")
            self._cache[rank] = state
        return self._cache[rank]

    def shards(self, rank: int) -> dict[int, tuple[int, int]]:
        state = self.load(rank)
        return {int(s): tuple(v) for s, v in state["shards"].items()} if state else {}

    def save(self, rank: int, state: dict[str, Any]) -> None:
        with atomic_path(self.path(rank)) as tmp:
            torch.save({"run": self.run, **state}, tmp)

    def clear(self) -> None:
        # rank files, and the temporaries of a save that a kill interrupted (atomic_path's ".rank<r>.pt.*.tmp")
        for p in [*self.dir.glob("rank*.pt"), *self.dir.glob(".rank*.pt.*.tmp")]:
            p.unlink(missing_ok=True)
        if self.dir.exists() and not any(self.dir.iterdir()):
            self.dir.rmdir()


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)} vs now {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


class SecondMomentModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, spec: ArchSpec, layers: list[int], *, dtype: torch.dtype = torch.float64,
                 partial: PartialStats | None = None, checkpoint_every: int = 0) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.layers = sorted(layers)
        self.names = [spec.down_proj_name(l) for l in self.layers]
        self.acc_dtype, self.partial, self.checkpoint_every = dtype, partial, checkpoint_every
        self.sums: dict[int, torch.Tensor] = {}
        self.count = 0
        self.resumed = 0  # tokens counted by an earlier, interrupted run
        self.shards: dict[int, tuple[int, int]] = {}
        self.steps = 0
        self.seconds = 0.0

    def on_predict_start(self) -> None:
        d = self.spec.key_size(self.model, self.layers[0])
        self.sums = {l: torch.zeros(d, d, dtype=self.acc_dtype, device=self.device) for l in self.layers}
        state = self.partial.load(self.global_rank) if self.partial else None
        if state:
            for l in self.layers:
                self.sums[l].copy_(state["sums"][l])
            self.count, self.steps = int(state["count"]), int(state["steps"])
            self.resumed = self.count
            self.shards = {int(s): tuple(v) for s, v in state["shards"].items()}
            self.seconds = float(state["seconds"])
        self._t0 = time.perf_counter()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        mask = batch["attention_mask"].bool()
        with TraceDict(self.model, self.names, retain_input=True, stop=self.names[-1]) as traces:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        for l, name in zip(self.layers, self.names):
            accumulate_second_moment(self.sums[l], traces[name].input[mask])
        shard = int(batch["shard"])
        self.count += int(batch["tokens"])
        self.shards[shard] = (int(batch["position"]), self.shards.get(shard, (0, 0))[1] + int(batch["tokens"]))
        self.steps += 1
        if self.partial and self.checkpoint_every and self.steps % self.checkpoint_every == 0:
            self._save_partial()

    def _elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self._t0

    def _save_partial(self) -> None:
        self.partial.save(self.global_rank, {
            "sums": {l: t.cpu() for l, t in self.sums.items()}, "count": self.count, "steps": self.steps,
            "shards": {s: list(v) for s, v in self.shards.items()}, "seconds": self._elapsed(),
        })

    def on_predict_end(self) -> None:
        """Sum the statistics of all ranks; every rank ends with the merged totals."""
        self.seconds = self._elapsed()
        counts = torch.tensor([self.count, self.resumed], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            for l in self.layers:
                self.sums[l] = self.trainer.strategy.reduce(self.sums[l], reduce_op="sum")
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.count, self.resumed = (int(c) for c in counts.tolist())
