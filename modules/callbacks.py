"""Callbacks that turn a finished optimisation into an applied, verified and recorded edit, and show it.

Each reads the edit from the training step's output (``outputs["edit"]``, set on the batch where a unit's
optimisation ends) and asks the editor for the phase it needs (``Editor.advance``: the phases still missing
run once, in order), so the callbacks may be listed in any order and share no state.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import lightning as L
from tqdm.auto import tqdm

from pipeline.editors.base import Edit
from pipeline.editors.ledger import Ledger

if TYPE_CHECKING:  # the loop imports these callbacks
    from .edit_loop import EditLoop

__all__ = ["ApplyEdit", "VerifyEdit", "RecordEdit", "EditProgress"]


def _finished(outputs: Any) -> Edit | None:
    return (outputs or {}).get("edit") if isinstance(outputs, dict) else None


class ApplyEdit(L.Callback):
    """Write the update into the weights (ROME: Λ (C⁻¹k*)ᵀ solved in float64; MEMIT: one low-rank ΔW per layer)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: EditLoop, outputs: Any, *args: Any) -> None:
        edit = _finished(outputs)
        if edit is not None:
            pl_module.editor.advance(edit, "applied")


class VerifyEdit(L.Callback):
    """Check the edit took and is not a disabling edit (ROME: P(new) > P(true) on the prompt and paraphrases,
    P(true) > P(new) on neighbours, ‖ΔW‖/‖W‖ and (C⁻¹k*)ᵀk* within limits); roll it back on failure."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: EditLoop, outputs: Any, *args: Any) -> None:
        edit = _finished(outputs)
        if edit is not None:
            pl_module.editor.advance(edit, "verified")


class RecordEdit(L.Callback):
    """Append the verified edit (its factors, norms, probabilities, timings, identities) to the ledger,
    atomically. ``run`` = (the request list's digest, each unit's position in it): recorded with every entry,
    so that a resumed run skips what is already there."""

    def __init__(
        self, ledger: Ledger, model_identity: dict[str, str], run: tuple[str, list[int]] | None = None
    ) -> None:
        self.ledger, self.model_identity, self.run = ledger, model_identity, run

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: EditLoop, outputs: Any, *args: Any) -> None:
        edit = _finished(outputs)
        if edit is None:
            return
        pl_module.editor.advance(edit, "verified")  # what is recorded is the verified edit
        t = time.perf_counter()
        run = {"requests": self.run[0], "index": self.run[1][pl_module.edits.index(edit)]} if self.run else None
        edit.entry_id = pl_module.editor.record(edit, self.ledger, self.model_identity, run)
        edit.timings["ledger"] = time.perf_counter() - t


class EditProgress(L.Callback):
    """A live bar per unit on a terminal (step, loss, P(target); read from the numbers the early stop already
    brought to the host, so it forces no sync) and one summary line when the unit is done."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.live = enabled, enabled and sys.stderr.isatty()
        self.bar: tqdm | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: EditLoop, outputs: Any, *args: Any) -> None:
        edit, finished = pl_module.current, _finished(outputs)
        if edit is None:
            return
        if edit.optimisation is None:  # nothing optimised (UltraEdit): one line once the unit is written
            if finished is not None and self.enabled:
                pl_module.editor.advance(finished, "verified")
                label = (
                    f"{pl_module.editor.method} batch [{pl_module.edits.index(finished) + 1}/{len(pl_module.units)}]"
                )
                print(
                    f"{label} {len(finished.requests)} requests, {sum(finished.timings.values()):.1f} s; "
                    f"{finished.status}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        opt, n = edit.optimisation, len(pl_module.units)
        label = f"{self._name(pl_module)} [{pl_module.edits.index(edit) + 1}/{n}]"
        losses = opt.losses
        if self.live and self.bar is None and finished is None:
            self.bar = tqdm(total=opt.steps, desc=label, leave=False, dynamic_ncols=True, file=sys.stderr)
        if self.bar is not None and losses[0]:
            self.bar.n = len(losses[0])
            self.bar.set_postfix_str(f"loss {losses[0][-1]:.3f}, P(target) {opt.p_target[0]:.3f}", refresh=True)
        if finished is None:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            pl_module.editor.advance(finished, "verified")  # the line reports the edit's outcome
            print(f"{label} {self._summary(finished, pl_module.editor.per_case)}", file=sys.stderr, flush=True)

    @staticmethod
    def _name(pl_module: EditLoop) -> str:
        return "v*" if pl_module.editor.method == "rome" else f"{pl_module.editor.method} batch"

    @staticmethod
    def _summary(edit: Edit, one_request: bool) -> str:
        opt = edit.optimisation
        if one_request:
            losses = opt.losses[0]
            return (
                f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, P(target) {opt.p_target[0]:.3f}, "
                f"{edit.timings.get('v_star', 0.0):.2f} s; {edit.status}"
            )
        first = sum(losses[0] for losses in opt.losses) / len(opt.losses)
        last = sum(losses[-1] for losses in opt.losses) / len(opt.losses)
        residual = getattr(getattr(edit, "result", None), "residual", None) or [0.0]
        return (
            f"{len(opt.losses)} requests, {max(map(len, opt.losses))} steps, mean loss {first:.3f} -> {last:.3f}, "
            f"mean P(target) {sum(opt.p_target) / len(opt.p_target):.3f}, residual {residual[0]:.2f} -> "
            f"{residual[-1]:.2f}, {sum(edit.timings.values()):.1f} s"
        )
