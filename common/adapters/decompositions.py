"""Deterministic factorizations of a pretrained weight, for adapters whose frozen factors come from W0.

Computed in float64 on the CPU and returned in float32, so every party that holds the same base model
rebuilds the same frozen factors without them ever travelling.
"""

from __future__ import annotations

import torch

PIVOT_FLOOR = 1e-6


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, σ_r, V_rᵀ) of `weight`, computed in float64 on the CPU, returned in float32.

    Each pair (u_i, v_i) is signed so v_i's largest-magnitude entry is positive: the SVD fixes them only
    up to sign, and every party must rebuild the same frozen factors.
    """
    u, s, vh = torch.linalg.svd(weight.detach().to(device="cpu", dtype=torch.float64), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    pivots = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    signs = torch.where(pivots < 0, -1.0, 1.0).to(torch.float64)
    return (u * signs).float(), s.float(), (vh * signs[:, None]).float()


def lu_bases(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r, U_r, D_r) in float32: left (d_out x r) and right (r x d_in) frozen bases, and the pivots.

    Pivoted LU in float64 on the CPU, W0 = P L U'; U = D⁻¹ U' is unit-upper with D = diag(U'). Pivots
    smaller than PIVOT_FLOOR in magnitude are clamped before dividing (tiny pivots blow U up).
    """
    p, lower, upper = torch.linalg.lu(weight.detach().to(device="cpu", dtype=torch.float64))
    pivots = torch.diagonal(upper)
    signs = torch.where(pivots < 0, -1.0, 1.0).to(pivots.dtype)
    pivots = torch.where(pivots.abs() < PIVOT_FLOOR, signs * PIVOT_FLOOR, pivots)
    unit_upper = upper / pivots[:, None]
    return (p @ lower[:, :rank]).float(), unit_upper[:rank].float(), pivots[:rank].float()
