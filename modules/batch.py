"""MEMIT / AlphaEdit batches in the edit stage: the batched z optimisation as a short Lightning training loop
(one ``fit`` for all of a run's batches), and the callbacks that write and record each batch.

Like ``modules/rome.py``: the loop's batches are (edit batch, step) pairs; at an edit batch's first step the
module calls ``pipeline.memit.begin_batch`` on the model as it is now (earlier batches applied); every step
calls ``ValueOptimisation.step`` for all the batch's requests at once; when every request has finished the
batch is ``finished`` and ``WriteBatch`` spreads z over the layer set (``memit.finish_batch``), then
``BatchLedger`` records the per-layer low-rank factors. The model is held in a plain ``BatchContext``: the
Trainer never moves or copies it. On a stop request the batch in progress is finished, written and recorded,
and no further batch begins (as ``modules/rome.py``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from pipeline.editors import memit
from pipeline.editors.ledger import Ledger
from pipeline.core.requests import EditRequest
from pipeline.core.signals import stop_requested

from .rome import finish_steps

__all__ = ["TargetOptimizer", "WriteBatch", "BatchLedger", "BatchProgress"]


class TargetOptimizer(L.LightningModule):
    def __init__(self, ctx: memit.BatchContext, batches: list[list[EditRequest]]) -> None:
        super().__init__()
        self.automatic_optimization = False  # ValueOptimisation.step does zero_grad, backward, Adam, clamp
        self.ctx, self.batches = ctx, batches
        self.state: memit.BatchState | None = None
        self.finished: memit.BatchState | None = None
        self.results: list[memit.BatchResult] = []
        self._index, self._t0 = -1, 0.0

    def train_dataloader(self) -> DataLoader:
        steps = int(self.ctx.hp.memit.v.steps)
        return DataLoader([(i, s) for i in range(len(self.batches)) for s in range(steps)], batch_size=None)

    def configure_optimizers(self) -> None:
        return None

    def training_step(self, batch: tuple[int, int], batch_idx: int) -> None:
        index, _ = batch
        self.finished = None
        if index != self._index:
            if stop_requested():  # between batches: begin no new one
                self.trainer.should_stop = True
                return None
            self._index = index
            self.state = memit.begin_batch(self.ctx, self.batches[index])
            self._t0 = time.perf_counter()
        opt = self.state.optimisation
        if opt.done:
            return None
        if finish_steps(opt):
            self.state.timings["v_star"] = time.perf_counter() - self._t0
            self.finished = self.state
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.finished = None


class WriteBatch(L.Callback):
    """z − h̄ spread over the layer set, one low-rank update per layer, in place."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: TargetOptimizer, *args: Any) -> None:
        if pl_module.finished is not None:
            pl_module.results.append(memit.finish_batch(pl_module.ctx, pl_module.finished))


class BatchLedger(L.Callback):
    """Records the batch (requests, per-layer factors, and for AlphaEdit the keys it preserves) in the ledger."""

    def __init__(self, ledger: Ledger, model_identity: dict[str, str], stats: dict[str, Any] | None,
                 run: tuple[str, list[int]] | None = None) -> None:
        self.ledger, self.model_identity, self.stats, self.run = ledger, model_identity, stats, run

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: TargetOptimizer, *args: Any) -> None:
        if pl_module.finished is None:
            return
        ctx, result = pl_module.ctx, pl_module.results[-1]
        t = time.perf_counter()
        run = {"requests": self.run[0], "index": self.run[1][len(pl_module.results) - 1]} if self.run else None
        self.ledger.append_batch(ctx, result, self.model_identity, self.stats, run)
        result.timings["ledger"] = time.perf_counter() - t


class BatchProgress(L.Callback):
    """One line per edit batch: steps, mean loss, mean P(target), residual before and after, seconds."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: TargetOptimizer, *args: Any) -> None:
        if pl_module.finished is None or not self.enabled:
            return
        r, n = pl_module.results[-1], len(pl_module.batches)
        first = sum(l[0] for l in r.losses) / len(r.losses)
        last = sum(l[-1] for l in r.losses) / len(r.losses)
        print(f"{pl_module.ctx.method} batch [{len(pl_module.results)}/{n}] {len(r.requests)} requests, "
              f"{max(map(len, r.losses))} steps, mean loss {first:.3f} -> {last:.3f}, mean P(target) "
              f"{sum(r.p_target) / len(r.p_target):.3f}, residual {r.residual[0]:.2f} -> {r.residual[-1]:.2f}, "
              f"{sum(r.timings.values()):.1f} s", file=sys.stderr, flush=True)
