"""Progress of an editor's plain loop (``Editor.edit(requests, on_step)``, no Lightning): one ``Step`` per
optimisation step, handed to a callback of the caller's, shown as a tqdm bar per unit when stderr is a
terminal, or, in a log, written as a line at most every ``HEARTBEAT_S`` seconds. The Python API (``rome.py``)
and the sequential eval use it; the edit stage shows its own bar from its Lightning loop
(``modules/callbacks.py`` ``EditProgress``), with the same numbers."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Step", "StepProgress", "step_of", "HEARTBEAT_S"]

# in a log, the most seconds between two lines (here and in modules/progress.py's phase lines): a batch of 100
# requests takes minutes of z steps on a CPU, and a log that says nothing for that long looks like a hung run
HEARTBEAT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Step:
    """Where an edit stands after one optimisation step (v* for ROME, z for MEMIT / AlphaEdit)."""

    unit: int  # the unit being optimised, from 1 (a request for ROME, a batch for the batch methods)
    units: int  # how many units the call edits
    step: int  # steps taken in this unit so far
    steps: int  # the most it takes (edit.v.steps / edit.memit.v.steps; it may stop early)
    loss: float  # the last step's loss, the mean over the unit's requests
    p_target: float  # the model's P(target) at the last step, the mean over the unit's requests


def step_of(optimisation: Any, unit: int = 1, units: int = 1) -> Step:
    """Where an optimisation stands: steps taken, the most it takes, and the mean over its requests of the last
    step's loss and P(target) (the one reading the API's bar and the edit stage's bar both show)."""
    losses = [run[-1] for run in optimisation.losses if run]
    return Step(
        unit=unit,
        units=units,
        step=max(map(len, optimisation.losses)),
        steps=int(optimisation.steps),
        loss=sum(losses) / max(len(losses), 1),
        p_target=sum(optimisation.p_target) / max(len(optimisation.p_target), 1),
    )


class StepProgress:
    """The ``on_step`` of ``Editor.edit``: turns the unit in progress into a ``Step`` for ``callback``, or, with
    no callback and ``bar`` true, into a tqdm bar per unit on stderr (``bar=None``: when stderr is a terminal;
    otherwise a line on stderr at most every ``heartbeat_s`` seconds; ``bar=False``: nothing)."""

    def __init__(
        self,
        units: int,
        label: str,
        callback: Callable[[Step], None] | None = None,
        bar: bool | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.units, self.label, self.callback = units, label, callback
        self.show = callback is None and (sys.stderr.isatty() if bar is None else bar)
        self.log = callback is None and bar is None and not self.show
        self.heartbeat_s, self.said = heartbeat_s, time.monotonic()
        self.unit, self.current, self.bar = 0, None, None

    def __call__(self, edit: Any) -> None:
        opt = edit.optimisation
        if opt is None:
            return
        if edit is not self.current:  # a new unit has begun
            self.close()
            self.current, self.unit = edit, self.unit + 1
        step = step_of(opt, self.unit, self.units)
        if self.callback is not None:
            self.callback(step)
        elif self.show:
            if self.bar is None:
                desc = f"{self.label} [{step.unit}/{step.units}]"
                # created after the unit's first step: ``initial`` keeps that step out of the rate (else it reads
                # thousands of steps a second)
                self.bar = tqdm(
                    total=step.steps, initial=step.step, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr
                )
            self.bar.n = step.step
            self.bar.set_postfix_str(f"loss {step.loss:.3f}, P(target) {step.p_target:.3f}", refresh=True)
        elif self.log and time.monotonic() - self.said >= self.heartbeat_s:
            self.said = time.monotonic()
            print(
                f"{self.label} [{step.unit}/{step.units}]: step {step.step}/{step.steps}, loss {step.loss:.3f}, "
                f"P(target) {step.p_target:.3f}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
