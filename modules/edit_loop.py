"""Any editor's optimisation as a short Lightning training loop: one ``fit`` for all of a run's requests.

The loop's batches are (unit, step) pairs, a unit being what the editor edits at once (a request for ROME, a
batch of requests for MEMIT / AlphaEdit). At a unit's first step the module calls ``editor.begin`` on the
model *as it is now* (earlier units applied); every step calls ``editor.step``; when the unit's optimisation
ends, ``training_step`` returns it (``{"edit": edit}``) and the callbacks (``modules/callbacks.py``) apply,
verify and record it; the rest of its steps are skipped. The callbacks read the edit from the step's output,
not from a flag on the module, and each asks the editor for the phase it needs (``Editor.advance``), so their
order does not matter. Lightning calls the module's own ``on_train_batch_end`` after every callback's: there
the edit is taken to its last phase and its outer wall time recorded.

The frozen model is held by the editor, a plain attribute, never a registered child module, so the Trainer
never moves, copies or re-modes it; the optimisation's state lives in the editor's objects on the model's
device. The one host sync per step is the early-stop check's.

Every phase is announced to the progress (``EditProgress``) as it starts: ``begin`` (the unedited model's
probabilities and answers, the keys), ``optimising`` (each step), ``applied`` (solve and apply), ``verified``,
``record``; it redraws itself while a phase runs, so a long phase is never silent.

On a stop request (SIGTERM, SIGINT: ``pipeline.core.signals``) a unit still in ``begin`` or its optimisation
is abandoned at the next forward pass or step (a recordable editor writes the weights in ``apply`` alone, so
nothing of it is in the model; it is edited again on resume); a unit whose optimisation has ended is applied,
verified and recorded whole. No further unit begins.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rome.pipeline.core.requests import EditRequest
from rome.pipeline.core.signals import stop_requested
from rome.pipeline.core.timing import sync
from rome.pipeline.editors.base import PHASES, Edit, Editor
from rome.pipeline.editors.ledger import Ledger

from .callbacks import ApplyEdit, EditProgress, RecordEdit, VerifyEdit
from .progress import Abandoned, abandon_if_stopped, on_forward
from .trainer import single_device_trainer

__all__ = ["EditLoop", "fit_edits"]


class EditLoop(L.LightningModule):
    def __init__(self, editor: Editor, requests: Sequence[EditRequest]) -> None:
        super().__init__()
        self.automatic_optimization = False  # the editor's step does zero_grad, backward, its optimiser, clamps
        self.editor = editor  # not an nn.Module: never registered, never moved
        self.units = editor.units(requests)
        self.edits: list[Edit] = []  # every unit begun, in order (an abandoned one is taken out again)
        self.current: Edit | None = None
        self.watchers: list[Any] = []  # the progress: ``.phase(loop, unit index, phase, detail)``
        # a stop request may abandon the unit in flight: only before its optimisation has ended, and only for an
        # editor that writes the weights in ``apply`` alone (a recordable one: its ledger entry is the whole change)
        self._abandonable = False
        self._mark = 0.0

    def train_dataloader(self) -> DataLoader:
        steps = self.editor.steps
        return DataLoader([(i, s) for i in range(len(self.units)) for s in range(steps)], batch_size=None)

    def configure_optimizers(self) -> list:
        return []  # each unit's optimiser lives in its optimisation object: none at the Trainer's level

    def on_train_start(self) -> None:
        sync(self.editor.model)
        self._mark = time.perf_counter()

    # -- the progress ------------------------------------------------------------------------------------
    def announce(self, index: int, phase: str, detail: str = "") -> None:
        """Tell the watchers that unit ``index`` enters ``phase`` (or, same phase, how far it is: ``detail``)."""
        for watcher in self.watchers:
            watcher.phase(self, index, phase, detail)

    def on_forward(self) -> None:
        """Before every forward pass of the model during ``fit_edits``: a stop request abandons the unit while
        that is still clean."""
        if self._abandonable:
            abandon_if_stopped()

    def advance(self, edit: Edit, phase: str) -> None:
        """``Editor.advance`` one phase at a time, each announced as it starts."""
        index = self.edits.index(edit)
        while PHASES.index(edit.phase) < PHASES.index(phase):
            following = PHASES[PHASES.index(edit.phase) + 1]
            self.announce(index, following)
            self.editor.advance(edit, following)

    # -- the loop -----------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[int, int], batch_idx: int) -> dict[str, Edit] | None:
        index, _ = batch
        try:
            if index == len(self.edits):  # the unit's first step
                if stop_requested():  # between units: begin no new one
                    self.trainer.should_stop = True
                    return None
                self._abandonable = self.editor.recordable
                self.announce(index, "begin")
                self.current = self.editor.begin(self.units[index])
                self.edits.append(self.current)
                self.announce(index, "optimising")
            edit = self.current
            if edit is None or edit.phase != "begun":  # ended early: the rest of its steps are skipped
                return None
            if self._abandonable:
                abandon_if_stopped()
            ended = self.editor.step(edit)
            while not ended and stop_requested():
                if self._abandonable:
                    raise Abandoned
                ended = self.editor.step(edit)  # an editor that cannot be abandoned finishes its unit
        except Abandoned:
            self._abandon(index)
            return None
        if not ended:
            return None
        self._abandonable = False  # from here on the unit is applied, verified and recorded whole
        self.advance(edit, "optimised")
        return {"edit": edit}

    def _abandon(self, index: int) -> None:
        del self.edits[index:]
        self.current, self._abandonable = None, False
        self.trainer.should_stop = True
        self.announce(index, "abandoned")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        edit = (outputs or {}).get("edit")
        if edit is None:
            return
        self.advance(edit, "verified")  # whatever phase no callback asked for
        sync(self.editor.model)
        now = time.perf_counter()
        edit.timings["wall"] = now - self._mark  # the framework's own work included
        self._mark = now

    def finished(self) -> list[Edit]:
        """The units that went through every phase (after a stop: those finished before it)."""
        return [e for e in self.edits if e.phase == "verified"]


def fit_edits(
    editor: Editor,
    requests: Sequence[EditRequest],
    cfg: DictConfig,
    ledger: Ledger | None = None,
    model_identity: dict[str, str] | None = None,
    progress: bool = True,
    run: tuple[str, list[int]] | None = None,
) -> list[Edit]:
    """Every request, unit by unit, through one Trainer and one ``fit`` (the edit stage's loop; benchmarks
    time it too). After a stop request: the units finished so far, each applied, verified and recorded whole
    (the one in flight, if still in its optimisation, abandoned)."""
    if not requests:
        return []
    callbacks: list[L.Callback] = [ApplyEdit(), VerifyEdit()]
    if ledger is not None:
        callbacks.append(RecordEdit(ledger, model_identity or {}, run))
    callbacks.append(EditProgress(enabled=progress))
    trainer = single_device_trainer(cfg, editor.model, callbacks)
    module = EditLoop(editor, requests)
    try:
        with on_forward(editor.model, module.on_forward):
            trainer.fit(module)
    except SIGTERMException:  # Lightning ends a fit on SIGTERM after the batch in progress: our stop request
        if not stop_requested():
            raise
    return module.finished()
