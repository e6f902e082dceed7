"""Matmuls in full precision for a block, whatever the process set globally.

PyTorch lets a process trade matmul precision for speed, and two of those trades are on in places we do not
control: cuBLAS may reduce the split-K partial sums of a bf16 / fp16 GEMM in bf16 / fp16
(``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` and its fp16 twin, both on by
default: relative errors of 1e-3 on a float32 output), and ``torch.set_float32_matmul_precision("high")``
(a common line in training scripts) turns on TF32 on a GPU and bf16 passes in oneDNN on a CPU (1e-5 to
1e-3). ``full_precision_reductions`` turns them off for the block and restores them after it; setting the
flags costs no device sync. The statistics' accumulation uses it (its budget is 1e-6 relative: docs/stats.md)
and so does the v* optimisation (a request's δ must not depend on the GEMM shapes its batch brings).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["full_precision_reductions", "precision_flags"]


def _flags(ieee_fp32: bool) -> list[tuple[object, str, object]]:
    """(backend, flag, the value it must have) for the block."""
    cuda, cpu = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    want: list[tuple[object, str, object]] = [
        (cuda, "allow_bf16_reduced_precision_reduction", False),
        (cuda, "allow_fp16_reduced_precision_reduction", False),
    ]
    if ieee_fp32:
        want += [(cuda, "fp32_precision", "ieee"), (cpu, "fp32_precision", "ieee")]
    return want


def precision_flags() -> dict[str, object]:
    """The flags ``full_precision_reductions`` sets, as they are now (what a test records at call time)."""
    return {
        f"{'cuda' if backend is torch.backends.cuda.matmul else 'mkldnn'}.{name}": getattr(backend, name, None)
        for backend, name, _ in _flags(ieee_fp32=True)
    }


@contextlib.contextmanager
def full_precision_reductions(ieee_fp32: bool = True) -> Iterator[None]:
    """bf16 / fp16 GEMMs reduce in float32 for the block; with ``ieee_fp32`` float32 matmuls are IEEE float32
    too (no TF32, no oneDNN bf16 passes). Only the new-style flags are touched (torch refuses to read a flag
    set through both its old and new API)."""
    changed = []
    for backend, name, value in _flags(ieee_fp32):
        old = getattr(backend, name, None)
        if old is not None and old != value:
            setattr(backend, name, value)
            changed.append((backend, name, old))
    try:
        yield
    finally:
        for backend, name, old in reversed(changed):
            setattr(backend, name, old)
