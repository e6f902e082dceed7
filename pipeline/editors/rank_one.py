"""The closed-form rank-one update of ROME.

With C = E[k k^T] over Wikipedia keys, the minimal-disturbance W' with W' k* = v* is

    W' = W + Λ (C⁻¹ k*)ᵀ,     Λ = (v* − W k*) / ((C⁻¹ k*)ᵀ k*)

(v* here excludes the layer's bias). C⁻¹k* is solved in float64 by Cholesky, never by an explicit inverse.
A batch edit (MEMIT, AlphaEdit) writes a low-rank ΔW = L Rᵀ (``LowRank``) through the same float64 path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from rome.pipeline.errors import UserError

__all__ = [
    "RankOne",
    "LowRank",
    "apply_low_rank",
    "KeySolver",
    "rank_one_update",
    "apply_rank_one",
    "update_norm",
    "frobenius_norm",
]


@dataclasses.dataclass
class RankOne:
    u: torch.Tensor  # C⁻¹k*, [d_ff], float64 (the "left" vector)
    lam: torch.Tensor  # Λ, [d_model], float64 (the "right" vector)
    denominator: float  # (C⁻¹k*)ᵀ k*


@dataclasses.dataclass
class LowRank:
    """ΔW = left @ rightᵀ in W's [d_model, d_ff] orientation (float64): a batch edit's update of one layer."""

    left: torch.Tensor  # [d_model, n]
    right: torch.Tensor  # [d_ff, n]

    def norm(self) -> float:
        """‖ΔW‖_F without forming ΔW: sqrt(trace((LᵀL)(RᵀR)))."""
        return float(((self.left.T @ self.left) * (self.right.T @ self.right)).sum().clamp_min(0).sqrt())


class KeySolver:
    """C⁻¹k for any key k, by one Cholesky factor of C + ridge·I (float64, on ``device``) computed once and
    reused for every edit of the layer; ``second_moment=None`` is C = I (no covariance adjustment). The factor
    follows the keys: when they arrive on another device (a model moved to its rank's GPU after the solver
    was built), it moves there once."""

    def __init__(
        self, second_moment: torch.Tensor | None, ridge: float = 0.0, device: torch.device | str | None = None
    ) -> None:
        self.factor: torch.Tensor | None = None
        if second_moment is None:
            return
        c = second_moment.to(device=device or second_moment.device, dtype=torch.float64)
        if ridge:
            c = c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        chol, info = torch.linalg.cholesky_ex(c)
        del c
        if int(info) != 0:
            d = second_moment.shape[0]
            raise UserError(
                f"the key second moment C ({d}x{d}) is not positive definite: too few statistics tokens "
                f"(it needs many more than {d}); raise stats.tokens (and give the data for them), "
                "or set edit.ridge=1e-4 to solve with C + ridge*I"
            )
        self.factor = chol

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C⁻¹k in float64 for k [d] (or [d, n])."""
        k = k.to(torch.float64)
        if self.factor is None:
            return k.clone()
        if self.factor.device != k.device:
            self.factor = self.factor.to(k.device)
        return torch.cholesky_solve(k[:, None] if k.dim() == 1 else k, self.factor).reshape(k.shape)


def rank_one_update(
    w: torch.Tensor,
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    solver: KeySolver,
    key_direction: torch.Tensor | None = None,
) -> RankOne:
    """``w`` is [d_model, d_ff] (out x in); ``v_star`` is the wanted W' k* (bias excluded). The update's
    direction is u = C⁻¹ ``key_direction`` (default k* itself; ROME's original takes the template-averaged
    key there while writing v* at the bare prompt's key)."""
    u = solver.solve(k_star if key_direction is None else key_direction)
    k = k_star.to(device=u.device, dtype=torch.float64)
    denominator = float(u @ k)
    w_k = torch.cat([block.to(device=u.device, dtype=torch.float64) @ k for block in _row_blocks(w)])
    lam = (v_star.to(device=u.device, dtype=torch.float64) - w_k) / denominator
    return RankOne(u=u, lam=lam, denominator=denominator)


def _row_blocks(w: torch.Tensor, max_bytes: int = 1 << 27):
    """Views of ``w``'s rows in blocks whose float64 copy stays under ``max_bytes`` (128 MiB): a 7B
    model's down-projection in float64 would be half a gigabyte of scratch at once."""
    rows = max(1, max_bytes // (8 * w.shape[1]))
    return w.split(rows, dim=0)


@torch.no_grad()
def _add_by_row_blocks(weight: torch.Tensor, add: Callable[[torch.Tensor, slice], None]) -> None:
    """``weight`` += ΔW, one row block at a time: each block is summed in float64 by ``add(total, rows)`` and
    cast to the weight's dtype once (elementwise the same result as one pass over the whole matrix)."""
    start = 0
    for block in _row_blocks(weight):
        total = block.to(torch.float64)
        add(total, slice(start, start + block.shape[0]))
        block.copy_(total)
        start += block.shape[0]


def apply_rank_one(weight: torch.Tensor, edit: RankOne, conv1d: bool) -> None:
    """Add ΔW = Λ uᵀ to a down-projection weight in place, in its storage orientation (Conv1D [in, out] or
    Linear [out, in]), formed in float64 per row block (no separate ΔW) and cast once. Edit and ledger rebuild
    both go through here, so a rebuild is bitwise."""
    lam, u = edit.lam.to(weight.device), edit.u.to(weight.device)
    left, right = (u, lam) if conv1d else (lam, u)  # ΔW in the storage orientation: left ⊗ right
    _add_by_row_blocks(weight, lambda total, rows: total.addr_(left[rows], right))


def frobenius_norm(w: torch.Tensor) -> float:
    """‖W‖_F accumulated in float64 over row blocks (no full float64 copy of W)."""
    return float(sum(block.to(torch.float64).square().sum() for block in _row_blocks(w)).sqrt())


def update_norm(edit: RankOne) -> float:
    """‖ΔW‖_F of a rank-one update: ‖Λ‖ ‖u‖ (no d_model x d_ff matrix needed)."""
    return float(edit.lam.norm() * edit.u.norm())


def apply_low_rank(weight: torch.Tensor, update: LowRank, conv1d: bool) -> None:
    """Add ΔW = L Rᵀ to a down-projection weight in place, in its storage orientation, formed in float64 per
    row block and cast once (the ledger's rebuild goes through here too: reverts stay bitwise)."""
    left, right = update.left.to(weight.device), update.right.to(weight.device)
    if conv1d:  # stored [d_ff, d_model] = ΔWᵀ = R Lᵀ
        left, right = right, left
    _add_by_row_blocks(weight, lambda total, rows: total.addmm_(left[rows], right.T))
