"""ROME's v* optimisation as a short Lightning training loop: one ``fit`` for all of a run's requests.

The loop's batches are (request, step) pairs. At a request's first step the module calls
``pipeline.rome.begin`` (pre-edit measurement, k*, v₀, the optimisation set up on the model *as it is
now*, so a later request sees the earlier edits); every step calls ``ValueOptimisation.step``; when the
request's optimisation ends (early stop or last step) the module exposes it as ``finished`` and the
callbacks (``modules/callbacks.py``) apply, verify and record it; the rest of its steps are skipped.

The frozen model is held in a plain ``EditContext`` attribute, not as a registered child module, so the
Trainer never moves, copies or re-modes it; δ and Adam live in the pipeline's ``ValueOptimisation`` on
the model's device. The one host sync per step is the early-stop check's.

On a stop request (SIGTERM, SIGINT: ``pipeline.signals``) the edit in progress runs its remaining steps in
the current batch, so that the callbacks apply, verify and record it whole, and no further edit begins.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from pipeline.editors import rome
from pipeline.core.requests import EditRequest
from pipeline.core.signals import stop_requested

__all__ = ["ValueOptimizer", "finish_steps"]


class ValueOptimizer(L.LightningModule):
    def __init__(self, ctx: rome.EditContext, requests: list[EditRequest]) -> None:
        super().__init__()
        self.automatic_optimization = False  # the pipeline's step does zero_grad, backward, Adam and the clamp
        self.ctx, self.requests = ctx, list(requests)  # EditContext is a dataclass: not registered, never moved
        self.current: rome.EditResult | None = None
        self.finished: rome.EditResult | None = None  # the edit whose optimisation ended at this batch
        self.results: list[rome.EditResult] = []
        self._index, self._t0 = -1, 0.0

    def train_dataloader(self) -> DataLoader:
        steps = int(self.ctx.hp.v.steps)
        return DataLoader([(i, s) for i in range(len(self.requests)) for s in range(steps)], batch_size=None)

    def configure_optimizers(self) -> None:
        return None  # one Adam per request, inside ValueOptimisation

    def training_step(self, batch: tuple[int, int], batch_idx: int) -> None:
        index, _ = batch
        self.finished = None
        if index != self._index:  # the request's first step
            if stop_requested():  # between edits: begin no new one
                self.trainer.should_stop = True
                return None
            self._index = index
            self.current = rome.begin(self.ctx, self.requests[index])
            self.results.append(self.current)
            self._t0 = time.perf_counter()
        opt = self.current.optimisation
        if opt.done:  # early-stopped: its remaining steps are skipped
            return None
        if finish_steps(opt):
            self.current.finish_value()
            self.current.timings["v_star"] = time.perf_counter() - self._t0  # step() ended in a host sync
            self.finished = self.current
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.finished = None  # the callbacks (called before this hook) have handled it


def finish_steps(opt: Any) -> bool:
    """One optimisation step; after a stop request, every remaining step (the edit is finished, not left
    half-done). True when the optimisation has ended."""
    ended = opt.step()
    while not ended and stop_requested():
        ended = opt.step()
    return ended
