"""Padding: token rows of different lengths as one [rows, width] batch and its attention mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["right_pad", "left_pad"]


def _pad(
    rows: Sequence[Sequence[int]], pad: int, device: torch.device | str | None, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(map(len, rows), default=0))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.as_tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    if device is not None:
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return ids, mask


def right_pad(
    rows: Sequence[Sequence[int]], pad: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` [rows, width] with ``pad`` after each row's tokens, and ``mask`` (1 on tokens, 0 on pads);
    width is the longest row (at least 1). Built on the host and copied once."""
    return _pad(rows, pad, device, left=False)


def left_pad(
    rows: Sequence[Sequence[int]], pad: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with the pads before each row's tokens: every row ends at the last column."""
    return _pad(rows, pad, device, left=True)
