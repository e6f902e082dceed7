"""Callbacks that turn a finished optimisation into an applied, verified and recorded edit, and show it.

Each reads the edit from the training step's output (``outputs["edit"]``, set on the batch where a unit's
optimisation ends) and asks the loop for the phase it needs (``EditLoop.advance``: the phases still missing
run once, in order, each announced to the progress as it starts), so the callbacks may be listed in any order
and share no state.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import lightning as L
from tqdm.auto import tqdm

from rome.pipeline.editors.base import Edit
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.editors.progress import step_of

from .progress import PhaseStatus, is_terminal

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
            pl_module.advance(edit, "applied")


class VerifyEdit(L.Callback):
    """Check the edit took and is not a disabling edit (the model now says the new object on the prompt:
    ``pipeline/editors/verification.py``; ROME also: P(new) > P(true) on the prompt and paraphrases,
    P(true) > P(new) on neighbours, ‖ΔW‖/‖W‖ and (C⁻¹k*)ᵀk* within limits); roll it back on failure (ROME)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: EditLoop, outputs: Any, *args: Any) -> None:
        edit = _finished(outputs)
        if edit is not None:
            pl_module.advance(edit, "verified")


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
        pl_module.advance(edit, "verified")  # what is recorded is the verified edit
        pl_module.announce(pl_module.edits.index(edit), "record")
        t = time.perf_counter()
        run = {"requests": self.run[0], "index": self.run[1][pl_module.edits.index(edit)]} if self.run else None
        edit.entry_id = pl_module.editor.record(edit, self.ledger, self.model_identity, run)
        edit.timings["ledger"] = time.perf_counter() - t


class EditProgress(L.Callback):
    """Each unit's phases as they start and while they run, and one summary line when the unit is done.

    On a terminal: a bar per unit over its optimisation's steps, its description the phase (``v* [2/3]
    optimising loss 0.310, P(target) 0.452``; before: the unedited model's numbers and the keys; after: solve
    and apply, verify, record), redrawn twice a second while a phase runs (the numbers are those the early
    stop already brought to the host, so it forces no sync). In a log: the summary line, and
    the unit's phase whenever ``heartbeat_s`` passed without a line."""

    PHASES = {  # EditLoop's phase -> what the progress says
        "begin": "the unedited model's probabilities and answers, the keys",
        "optimising": "optimising",
        "optimised": "optimised",
        "applied": "solving and applying the update",
        "verified": "verifying the edited model",
        "record": "recording in the ledger",
    }

    def __init__(
        self, enabled: bool = True, live: bool | None = None, file: TextIO | None = None, heartbeat_s: float = 10.0
    ) -> None:
        self.enabled, self.file, self.heartbeat_s = enabled, file if file is not None else sys.stderr, heartbeat_s
        self.live = enabled and (is_terminal(self.file) if live is None else live)
        self.bar: tqdm | None = None
        self.status = PhaseStatus(self.file, None, heartbeat_s)
        self.label = ""

    def setup(self, trainer: L.Trainer, pl_module: EditLoop, stage: str) -> None:
        if self.enabled and self not in pl_module.watchers:
            pl_module.watchers.append(self)

    # -- what the loop announces ------------------------------------------------------------------------
    def phase(self, loop: EditLoop, index: int, phase: str, detail: str = "") -> None:
        if phase == "begin":
            self._close()
            self.label = f"{self._name(loop)} [{index + 1}/{len(loop.units)}]"
            if self.live:
                text = f"{self.label} {self.PHASES['begin']}"
                self.bar = tqdm(total=loop.editor.steps, desc=text, leave=False, dynamic_ncols=True, file=self.file)
            self.status = PhaseStatus(self.file, self.bar, self.heartbeat_s)
        elif phase == "optimised" and self.bar is not None and loop.edits[index].optimisation is not None:
            self.bar.n = max(map(len, loop.edits[index].optimisation.losses))  # the last step shows no batch end
        elif phase == "abandoned":
            self._close()
            self.status.line(
                f"stopped: {self.label} abandoned before anything was written to the model; "
                "it is edited again on resume"
            )
            return
        self.status.set(self.label, self.PHASES.get(phase, phase), detail)

    # -- the steps and the end of a unit ------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: EditLoop, outputs: Any, *args: Any) -> None:
        edit, finished = pl_module.current, _finished(outputs)
        if not self.enabled or edit is None:
            return
        opt = (finished or edit).optimisation
        if finished is None:
            if opt is not None and edit.phase == "begun" and any(opt.losses):
                step = step_of(opt)
                if self.bar is not None:
                    self.bar.n = step.step
                self.status.set(
                    self.label, self.PHASES["optimising"], f"loss {step.loss:.3f}, P(target) {step.p_target:.3f}"
                )
            return
        pl_module.advance(finished, "verified")  # the line reports the edit's outcome
        self._close()
        if opt is None:  # nothing optimised (UltraEdit)
            summary = f"{len(finished.requests)} requests, {sum(finished.timings.values()):.1f} s; {finished.status}"
        else:
            summary = self._summary(finished, pl_module.editor.per_case)
        self.status.line(f"{self.label} {summary}")

    def on_train_end(self, trainer: L.Trainer, pl_module: EditLoop) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: EditLoop, exception: BaseException) -> None:
        self._close()  # end the bar's line: the stop message gets a line of its own

    def _close(self) -> None:
        self.status.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = self.status.bar = None

    @staticmethod
    def _name(pl_module: EditLoop) -> str:
        return "v*" if pl_module.editor.method == "rome" else f"{pl_module.editor.name} batch"

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
