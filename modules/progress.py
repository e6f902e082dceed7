"""What the long stages show while they work, and where a stop request may cut a unit of work short.

- ``TokenProgressBar``: a bar in tokens, with tokens/s, for stages that stream text through ``trainer.predict``.
- ``PhaseStatus``: the phase a unit of work is in (``rome: v* step 7/20``), said when it changes and while it
  lasts: on a terminal it redraws a tqdm bar, in a log it writes a line whenever ``heartbeat_s`` passed
  without one, indented under the lines of finished units (a log gets neither a line per step nor hours of
  silence).
- ``CaseProgress``: the case-mode eval's bar (``eval [case 3/5] rome: v* step 7/20``) over the cases really
  finished, i.e. recorded in the rank's case file.
- ``on_forward`` and ``Abandoned``: every forward pass of the model (a scoring chunk, a generated token, a v*
  step) calls back, to abandon the unit in flight once a stop was requested, so that Ctrl+C acts within one
  forward pass instead of after the unit.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

import lightning as L
from torch import nn
from tqdm.auto import tqdm

from rome.pipeline.core.signals import stop_requested
from rome.pipeline.editors.progress import HEARTBEAT_S

__all__ = [
    "TokenProgressBar",
    "PhaseStatus",
    "CaseProgress",
    "Abandoned",
    "abandon_if_stopped",
    "on_forward",
    "is_terminal",
]


class Abandoned(BaseException):
    """A stop request cuts the unit of work in flight short (raised between its steps or from a forward pass).
    The loop that owns the unit catches it, keeps nothing of the unit and begins no other; the unit is done
    again on resume. A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way
    swallows it."""


def abandon_if_stopped() -> None:
    """Raise ``Abandoned`` once a stopping signal arrived."""
    if stop_requested():
        raise Abandoned


@contextlib.contextmanager
def on_forward(model: nn.Module, callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` before every forward pass of ``model`` for the duration (a forward pre-hook on the
    top-level module: scoring, ``generate`` and the editors' optimisations all call the model itself)."""
    handle = model.register_forward_pre_hook(lambda module, args: callback())
    try:
        yield
    finally:
        handle.remove()


def is_terminal(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


class PhaseStatus:
    """The phase a unit of work is in: ``prefix`` (the unit: ``eval [case 3/5]``), ``phase`` (what runs:
    ``rome: v*``) and ``detail`` (how far: ``step 7/20``, changing without starting a new phase).

    With ``bar`` (a terminal): the bar's description is ``prefix phase detail`` from each ``set``, redrawn every
    ``refresh_s`` in between, with the phase's seconds once it has run 2 s, so the line moves while work goes
    on, even inside one long forward pass. Without (stderr is a log file): that line, indented, whenever
    ``heartbeat_s`` passed without a line (``line`` resets the wait). The redraws come from a daemon thread,
    started by the first ``set`` and stopped by ``close``; every write holds one lock."""

    def __init__(
        self, file: TextIO, bar: tqdm | None = None, heartbeat_s: float = HEARTBEAT_S, refresh_s: float = 0.5
    ) -> None:
        self.file, self.bar, self.heartbeat_s, self.refresh_s = file, bar, heartbeat_s, refresh_s
        self.prefix, self.phase, self.detail = "", "", ""
        now = time.monotonic()
        self.since = self.drawn = self.said = now
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None

    def set(self, prefix: str, phase: str, detail: str = "") -> None:
        with self._lock:
            now = time.monotonic()
            if (prefix, phase) != (self.prefix, self.phase):
                self.since = now
            self.prefix, self.phase, self.detail = prefix, phase, detail
            self._show(now, force=True)
        if self._ticker is None and phase and not self._closed.is_set():
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()

    def text(self, now: float | None = None) -> str:
        seconds = (time.monotonic() if now is None else now) - self.since
        words = " ".join(w for w in (self.prefix, self.phase, self.detail) if w)
        return words + (f" ({seconds:.0f} s)" if seconds >= 2 and self.phase else "")

    def line(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        with self._lock:
            self._line(text)

    def close(self) -> None:
        """Stop the redraws; the bar is the caller's to close."""
        self._closed.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()

    def _tick(self) -> None:
        while not self._closed.wait(self.refresh_s):
            with self._lock:
                if not self._closed.is_set():
                    self._show(time.monotonic(), force=False)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            self.file.write(text + "\n")
            self.file.flush()
        self.said = time.monotonic()

    def _show(self, now: float, force: bool) -> None:
        if self.bar is not None:
            if force or now - self.drawn >= self.refresh_s:
                self.bar.set_description_str(self.text(now), refresh=True)
                self.drawn = now
        elif self.phase and now - self.said >= self.heartbeat_s:
            self._line(f"  {self.text(now)}")  # indented: work in progress, under the lines of finished units


class CaseProgress:
    """The case-mode eval's progress on rank 0: which case, which method, which phase, and a count of the cases
    *finished* (each with its results appended to the rank's case file; an abandoned case is not counted).

    On a terminal: ``eval [case 3/5] rome: v* step 7/20 |███▌  | 2/5 cases done [04:12<06:18]``, redrawn at
    each phase and twice a second while a phase runs. In a log: a line per finished case (its seconds per
    method), and the case and phase whenever ``heartbeat_s`` passed without a line. ``show=False``: nothing
    (other ranks)."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        label: str = "eval",
        show: bool = True,
        file: TextIO | None = None,
        live: bool | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.total, self.done, self.label, self.show = total, done, label, show
        self.file = file if file is not None else sys.stderr
        live = show and (is_terminal(self.file) if live is None else live)
        self.bar = (
            tqdm(
                total=total,
                initial=done,
                desc=label,
                unit="case",
                dynamic_ncols=True,
                file=self.file,
                bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} cases done [{elapsed}<{remaining}]",
            )
            if live
            else None
        )
        self.status = PhaseStatus(self.file, self.bar, heartbeat_s)
        self.started = time.monotonic()

    @property
    def prefix(self) -> str:
        return f"{self.label} [case {self.done + 1}/{self.total}]" if self.done < self.total else self.label

    def start(self) -> None:
        """The next case begins."""
        self.started = time.monotonic()
        self.phase("starting")

    def phase(self, phase: str, detail: str = "") -> None:
        if self.show:
            self.status.set(self.prefix, phase, detail)

    def finish(self, seconds: Mapping[str, float]) -> None:
        """The case's results are recorded: count it; in a log, its line (``seconds``: per part of the case)."""
        if not self.show:
            return
        took = time.monotonic() - self.started
        if self.bar is None:
            parts = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
            self.status.line(f"{self.prefix} done in {took:.1f} s ({parts})")
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        self.status.set(self.prefix, "")

    def abandon(self) -> None:
        if self.show:
            self.close()
            self.status.line(
                f"{self.prefix} abandoned on the stop request after {time.monotonic() - self.started:.1f} s: "
                "nothing of it was recorded, it is evaluated again on resume"
            )

    def close(self) -> None:
        self.status.close()
        if self.bar is not None:
            self.bar.set_description_str(self.label, refresh=False)
            self.bar.close()
            self.bar = self.status.bar = None


class TokenProgressBar(L.Callback):
    """Counts the tokens of rank 0 against rank 0's share of the budget (other ranks run in step), from the
    tokens a resumed run starts with (``pl_module.count``, loaded in the module's ``setup``)."""

    def __init__(self, total: int, desc: str = "tokens") -> None:
        self.total, self.desc = total, desc
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            share = -(-self.total // trainer.world_size)
            label = self.desc if trainer.world_size == 1 else f"{self.desc} (rank 0 of {trainer.world_size})"
            self.bar = tqdm(
                total=share,
                desc=label,
                unit="tok",
                unit_scale=True,
                dynamic_ncols=True,
                initial=getattr(pl_module, "count", 0),
            )

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.bar is not None:
            self.bar.update(int(batch["tokens"]))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_predict_end(trainer, pl_module)  # end the bar's line: the stop message gets a line of its own
