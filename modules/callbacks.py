"""Callbacks that turn a finished v* optimisation into an applied, verified and recorded edit, plus a
one-line-per-edit progress display. Each acts on ``pl_module.finished`` (set on the batch where an edit's
optimisation ends) and calls the pipeline; the list order is the order they run in:
ApplyEdit, VerifyEdit, LedgerCheckpoint, EditProgress.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from tqdm.auto import tqdm

from pipeline.core.timing import sync
from pipeline.editors import rome
from pipeline.editors.ledger import Ledger

from .rome import ValueOptimizer

__all__ = ["ApplyEdit", "VerifyEdit", "LedgerCheckpoint", "EditProgress", "ledger_entry"]


class ApplyEdit(L.Callback):
    """Solve Λ (C⁻¹k*)ᵀ in float64 and write it into the down-projection in its own orientation."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ValueOptimizer, *args: Any) -> None:
        if pl_module.finished is not None:
            rome.apply_edit(pl_module.ctx, pl_module.finished)


class VerifyEdit(L.Callback):
    """Checks the edit took (P(new) > P(true) on the prompt and paraphrases, P(true) > P(new) on
    neighbours) and is not a disabling edit (‖ΔW‖/‖W‖ and (C⁻¹k*)ᵀk* within limits); rolls back on failure."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ValueOptimizer, *args: Any) -> None:
        if pl_module.finished is not None:
            rome.verify_edit(pl_module.ctx, pl_module.finished)


def ledger_entry(ctx: rome.EditContext, result: rome.EditResult, model_identity: dict[str, str]) -> dict[str, Any]:
    return {
        # a failed check without rollback leaves the edit in the weights: it stays "applied"
        "status": "rolled_back" if result.status == "rolled_back" else "applied",
        "verified": result.status == "applied", "reason": result.reason, "request": result.request.as_dict(),
        "true_from_model": result.true_from_model,
        "layer": result.layer, "module": result.module, "conv1d": ctx.spec.down_proj_conv1d,
        "denominator": result.update.denominator, "norms": result.norms, "probs": result.probs,
        "generations": result.generations, "losses": result.losses, "timings": result.timings,
        "model": model_identity, "stats": ctx.stats_id,
    }


class LedgerCheckpoint(L.Callback):
    """Appends the edit (vectors, norms, probabilities, timings, identities) to the ledger, atomically.
    ``run`` = (the request list's digest, each request's position in it): recorded with every entry, so that
    a resumed run skips what is already there."""

    def __init__(self, ledger: Ledger, model_identity: dict[str, str], run: tuple[str, list[int]] | None = None) -> None:
        self.ledger, self.model_identity, self.run = ledger, model_identity, run

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ValueOptimizer, *args: Any) -> None:
        result = pl_module.finished
        if result is None or result.update is None:
            return
        t = time.perf_counter()
        entry = ledger_entry(pl_module.ctx, result, self.model_identity)
        if self.run is not None:
            entry["run"] = {"requests": self.run[0], "index": self.run[1][pl_module.results.index(result)]}
        result.entry_id = self.ledger.append(entry, result.update)
        result.timings["ledger"] = time.perf_counter() - t


class EditProgress(L.Callback):
    """One line per edit: a live bar on a terminal (step, loss, P(target); read from the numbers the early
    stop already brought to the host, so it forces no sync), one summary line when the edit is done.
    Also records each edit's outer wall time (``timings['wall']``): from the end of the previous edit (or
    the start of the fit) to the end of this one, the framework's own work included."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.live = enabled, enabled and sys.stderr.isatty()
        self.bar: tqdm | None = None
        self._mark = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: ValueOptimizer) -> None:
        sync(pl_module.ctx.model)
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ValueOptimizer, *args: Any) -> None:
        result = pl_module.current
        if result is None:
            return
        opt, n = result.optimisation, len(pl_module.requests)
        label = f"v* [{pl_module.results.index(result) + 1}/{n}]"
        if self.live and self.bar is None and pl_module.finished is None:
            self.bar = tqdm(total=opt.steps, desc=label, leave=False, dynamic_ncols=True, file=sys.stderr)
        if self.bar is not None and opt.losses[0]:
            self.bar.n = len(opt.losses[0])
            self.bar.set_postfix_str(f"loss {opt.losses[0][-1]:.3f}, P(target) {opt.p_target[0]:.3f}", refresh=True)
        if pl_module.finished is not None:
            sync(pl_module.ctx.model)
            now = time.perf_counter()
            result.timings["wall"] = now - self._mark
            self._mark = now
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.enabled:
                losses = result.losses
                print(f"{label} {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                      f"P(target) {result.p_target:.3f}, {result.timings['v_star']:.2f} s; {result.status}",
                      file=sys.stderr, flush=True)
