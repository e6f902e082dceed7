"""C = E[k k^T]: the uncentred second moment of the keys entering an MLP down-projection, accumulated.

``accumulate_second_moment``: the keys arrive in the model's dtype; the running total Σ k kᵀ is kept in
``stats.dtype`` (float64 by default). ``product="fp32"`` (``stats.product``'s default) forms each block's
kᵀk with float32 accumulation, the fast path (bf16/fp16 keys on a GPU: one tensor-core GEMM with float32
output, whose products of bf16 numbers are exact; float32 keys: an IEEE float32 GEMM), and adds it into the
float64 total; the block runs with full-precision reductions whatever the process set (no reduced-precision
split-K sums in cuBLAS, no TF32, no oneDNN bf16 passes: ``pipeline.core.precision``). ``product="exact"``
casts the keys to the total's dtype first (the all-float64 path). The fast path's relative Frobenius error
against the exact one is about 1e-7 on real keys (budget: 1e-6; docs/stats.md, "Precision budget"). The
same batches give the same bits, so resumed and multi-process runs stay identical (the batches, and the
texts the budget covers, do not depend on the number of processes: ``pipeline.stats.text``).

Where C is kept on disk, looked up, loaded and saved: ``pipeline.stats.store``.
"""

from __future__ import annotations

import functools

import torch

from rome.pipeline.core.precision import full_precision_reductions
from rome.pipeline.stats.store import LayerStats  # re-exported: the edit code imports it from here

__all__ = ["PRODUCTS", "PRODUCT_TOKENS", "accumulate_second_moment", "LayerStats"]

PRODUCTS = ("fp32", "exact")
PRODUCT_TOKENS = 8192  # keys per float32 product: float32 sums over longer runs of keys lose more bits


@functools.cache
def _has_float32_output_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for ``dtype`` on ``device`` (CUDA builds of
    recent torch, for bf16 / fp16); asked once per device and dtype, never per batch."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        torch.mm(a.T, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError):
        return False


def _fp32_product(keys: torch.Tensor) -> torch.Tensor:
    if _has_float32_output_mm(keys.device, keys.dtype):
        return torch.mm(keys.T, keys, out_dtype=torch.float32)  # tensor cores, float32 accumulation and output
    k = keys.float()  # exact: every bf16/fp16 value is a float32 value
    return k.T @ k


def accumulate_second_moment(total: torch.Tensor, keys: torch.Tensor, product: str) -> None:
    """``total += keys^T keys``; ``keys`` is [tokens, d_ff], one row per token; ``product``: fp32 | exact (see
    the module docstring). No host-device sync."""
    if product == "exact":
        k = keys.to(total.dtype)
        total.addmm_(k.T, k)
        return
    if product != "fp32":
        raise ValueError(f"product={product!r} is not one of {PRODUCTS}")
    with full_precision_reductions():
        for block in keys.split(PRODUCT_TOKENS):
            total.add_(_fp32_product(block))
