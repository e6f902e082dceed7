"""One clock for every phase timing, and the model's device: a CUDA device is synchronised before each
reading, so a phase's seconds are the work it launched, not the work still queued when it returned."""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["model_device", "sync", "Clock"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the project never splits a model over devices)."""
    return next(model.parameters()).device


def sync(where: nn.Module | torch.device | str) -> None:
    """Wait for the device of ``where`` (a model or a device), so that a host clock read after it measures
    finished work. A no-op on the CPU."""
    device = model_device(where) if isinstance(where, nn.Module) else torch.device(where)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Laps into ``timings`` (seconds, added to what a name already holds); synchronised at start and at
    every lap, so each phase owns its work."""

    def __init__(self, where: nn.Module | torch.device | str, timings: dict[str, float] | None = None) -> None:
        self.where, self.timings = where, {} if timings is None else timings
        sync(where)
        self.t = time.perf_counter()

    def lap(self, name: str) -> float:
        """Add the seconds since the last lap (or the start) to ``timings[name]``; returns them."""
        sync(self.where)
        now = time.perf_counter()
        seconds = now - self.t
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.t = now
        return seconds
