"""The closed-form rank-one update of ROME.

With C = E[k k^T] over Wikipedia keys, the minimal-disturbance W' with W' k* = v* is

    W' = W + Λ (C⁻¹ k*)ᵀ,     Λ = (v* − W k*) / ((C⁻¹ k*)ᵀ k*)

(v* here excludes the layer's bias). C⁻¹k* is solved in float64 by Cholesky, never by an explicit inverse.
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import UserError

__all__ = ["RankOne", "solve_c_inv_k", "rank_one_update", "apply_rank_one", "rank_one_delta"]


@dataclasses.dataclass
class RankOne:
    u: torch.Tensor  # C⁻¹k*, [d_ff], float64 (the "left" vector)
    lam: torch.Tensor  # Λ, [d_model], float64 (the "right" vector)
    denominator: float  # (C⁻¹k*)ᵀ k*


def solve_c_inv_k(second_moment: torch.Tensor | None, k: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """C⁻¹k in float64 by Cholesky of C + ridge·I; C = None means the identity (no covariance adjustment)."""
    k = k.to(torch.float64)
    if second_moment is None:
        return k.clone()
    c = second_moment.to(device=k.device, dtype=torch.float64)
    if ridge:
        c = c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise UserError("the key second moment C is not positive definite (too few statistics tokens?); "
                        "collect more with stats.tokens=... or add a ridge with edit.ridge=1e-4")
    return torch.cholesky_solve(k[:, None], chol)[:, 0]


def rank_one_update(w: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor, second_moment: torch.Tensor | None,
                    ridge: float = 0.0) -> RankOne:
    """``w`` is [d_model, d_ff] (out x in); ``v_star`` is the wanted W' k* (bias excluded)."""
    k = k_star.to(torch.float64)
    u = solve_c_inv_k(second_moment, k, ridge)
    denominator = float(u @ k)
    lam = (v_star.to(torch.float64) - w.to(torch.float64) @ k) / denominator
    return RankOne(u=u, lam=lam, denominator=denominator)


def rank_one_delta(edit: RankOne) -> torch.Tensor:
    """ΔW = Λ uᵀ as [d_model, d_ff] in float64."""
    return torch.outer(edit.lam, edit.u)


@torch.no_grad()
def apply_rank_one(weight: torch.Tensor, edit: RankOne, conv1d: bool) -> None:
    """Add ΔW to a down-projection weight in place, in its storage orientation (Conv1D [in, out] or
    Linear [out, in]); the sum is formed in float64 and cast to the weight's dtype once."""
    delta = rank_one_delta(edit).to(weight.device)
    if conv1d:
        delta = delta.T
    weight.copy_((weight.to(torch.float64) + delta).to(weight.dtype))
