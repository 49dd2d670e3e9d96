"""LQ-LoRA (Guo et al. 2024): W ≈ Q + L1 L2, a low-bit quantized part plus a high-precision rank-r part.

Alternating decomposition (paper Alg. 1, card 37): start with Q = 0 and repeat T times
    L1 L2 <- SVD_r(W - Q),        Q <- quantize(W - L1 L2),
recording ‖W - Q - L1 L2‖_F after each iteration and keeping the best iterate, since the iteration is
not guaranteed to be monotone. The quantizer is our NF-b blockwise quantizer (`common.bases.blockwise`).

Split decision: L1 = U_r Σ_r and L2 = V_rᵀ (the paper uses Σ^{1/2} on both sides; the product is the
same). L2 then has orthonormal rows, so the start state is already in FedSVD form: L2 plays A (frozen on
the clients), L1 plays B (trained under DP-SGD and averaged exactly), and the adapter starts non-zero.

Data-aware variant (paper Sec. 3.3): minimise ‖√F ⊙ (W - Q - L1 L2)‖_F with F the diagonal empirical
Fisher (`common.bases.fisher`). Derivation: if √F = d_r d_cᵀ (rank 1, positive), then
Σ_ij F_ij R_ij² = Σ_ij (d_r,i R_ij d_c,j)² = ‖D_r R D_c‖_F², and since D_r, D_c are invertible, L ↦ D_r L D_c
maps the rank-r matrices onto themselves; Eckart-Young in the scaled space gives the exact minimiser
L1 L2 = D_r⁻¹ SVD_r(D_r (W - Q) D_c) D_c⁻¹. A measured F is not rank 1: we take d_r d_cᵀ as the best rank-1
fit of √F (`row_col_weights`; for a rank-1 F it equals √F, as would √(r cᵀ / Σ F) from the row sums r and
column sums c), and the step is then exact for that fit. Decision (the card is unsure): only the low-rank
step is weighted; the quantization step stays the plain NF quantizer. Under DP the weights must come from
public data: `fisher_data = "public"`; `"private"` is refused because reading the clients' data for the
Fisher would spend privacy budget that fedlora does not account for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.bases.blockwise import BlockQuantConfig, QuantizedTensor, dequantize, quantize
from common.bases.fedsvd_form import fedsvd_form

FISHER_DATA = ("none", "public")


def check_fisher_data(fisher_data: str) -> None:
    """Accept "none" or "public"; refuse "private" (its privacy cost is not accounted) and anything else."""
    if fisher_data == "private":
        raise ValueError(
            "fisher_data = 'private' is refused: Fisher weights computed on the clients' private data spend "
            "privacy budget that fedlora does not account for; use 'public' (calibration text the server "
            "holds) or 'none' (data-free decomposition)"
        )
    if fisher_data not in FISHER_DATA:
        raise ValueError(f"fisher_data = {fisher_data!r} is invalid: choose one of {', '.join(FISHER_DATA)}")


@dataclass
class RowColWeights:
    """Positive diagonal weights D_r (d_out) and D_c (d_in) with √F ≈ D_r 1 1ᵀ D_c."""

    rows: torch.Tensor
    cols: torch.Tensor


def row_col_weights(fisher: torch.Tensor, floor: float = 1e-6) -> RowColWeights:
    """The rank-1 factorisation of √F (F >= 0, d_out x d_in) as positive row and column weights.

    The top singular pair of a non-negative matrix can be taken non-negative (Perron-Frobenius), so
    |u_1| √σ_1 and |v_1| √σ_1 are the best rank-1 fit; entries are floored at `floor` times the largest
    so that D_r and D_c stay invertible.
    """
    if torch.any(fisher < 0):
        raise ValueError("the diagonal Fisher must be non-negative")
    u, s, vh = torch.linalg.svd(fisher.detach().double().sqrt(), full_matrices=False)
    rows, cols = u[:, 0].abs() * s[0].sqrt(), vh[0].abs() * s[0].sqrt()
    return RowColWeights(rows.clamp_min(floor * rows.max()), cols.clamp_min(floor * cols.max()))


def low_rank_step(residual: torch.Tensor, rank: int, weights: RowColWeights | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, L2) in FedSVD form (L2 orthonormal rows), float64: the (weighted) best rank-r fit of the residual.

    Unweighted this is Eckart-Young; weighted, the SVD of D_r R D_c mapped back by D_r⁻¹ and D_c⁻¹
    minimises ‖D_r (R - L1 L2) D_c‖_F over rank-r L1 L2 (the same theorem in the scaled space).
    """
    residual = residual.double()
    if weights is None:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        return fedsvd_form(u[:, :rank] * s[:rank], vh[:rank])  # same factors, canonical signs
    rows, cols = weights.rows.double(), weights.cols.double()
    u, s, vh = torch.linalg.svd(rows[:, None] * residual * cols[None, :], full_matrices=False)
    return fedsvd_form((u[:, :rank] * s[:rank]) / rows[:, None], vh[:rank] / cols[None, :])


def decomposition_error(weight: torch.Tensor, q: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor,
                        weights: RowColWeights | None = None) -> float:
    """‖W - Q - L1 L2‖_F, or ‖D_r (W - Q - L1 L2) D_c‖_F with weights (the objective being minimised)."""
    residual = weight.double() - q.double() - l1.double() @ l2.double()
    if weights is not None:
        residual = weights.rows.double()[:, None] * residual * weights.cols.double()[None, :]
    return float(torch.linalg.norm(residual))


@dataclass
class LQDecomposition:
    """The kept iterate: W ≈ dequantize(q) + l1 @ l2, with the error of every iteration."""

    q: QuantizedTensor
    l1: torch.Tensor        # d_out x r, U_r Σ_r (the B role)
    l2: torch.Tensor        # r x d_in, orthonormal rows (the A role)
    errors: list[float]     # error after iteration t = 0..T-1 (weighted when weights were given)
    best: int               # index of the kept iterate: errors[best] == min(errors)


def lq_decompose(weight: torch.Tensor, rank: int, quantizer: BlockQuantConfig, iters: int = 10,
                 weights: RowColWeights | None = None, fisher_data: str = "none") -> LQDecomposition:
    """Alternate L1L2 = SVD_r(W - Q) and Q = quantize(W - L1L2) `iters` times; keep the best iterate.

    Parameters
    ----------
    weight : the frozen matrix W (d_out x d_in).
    rank : r, 1 <= r <= min(d_out, d_in).
    quantizer : the NF blockwise configuration used for Q.
    iters : T >= 1 iterations; iteration 0 is L = SVD_r(W), Q = quantize(W - L).
    weights : optional row/column Fisher weights (see `row_col_weights`); needs fisher_data = "public".
    fisher_data : "none" (data-free) or "public"; "private" is refused.
    """
    check_fisher_data(fisher_data)
    if (weights is None) != (fisher_data == "none"):
        raise ValueError("give Fisher weights exactly when fisher_data = 'public' (weights from public data)")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank = {rank} is invalid for a {tuple(weight.shape)} matrix: use 1..{min(weight.shape)}")
    if iters < 1:
        raise ValueError(f"iters = {iters} is invalid: at least one iteration")
    w = weight.detach().double()
    q_dense = torch.zeros_like(w)
    errors: list[float] = []
    kept: LQDecomposition | None = None
    for step in range(iters):
        l1, l2 = low_rank_step(w - q_dense, rank, weights)
        q = quantize((w - l1 @ l2).float(), quantizer)
        q_dense = dequantize(q).double()
        errors.append(decomposition_error(w, q_dense, l1, l2, weights))
        if kept is None or errors[-1] < min(errors[:-1]):
            kept = LQDecomposition(q, l1.to(weight.dtype), l2.to(weight.dtype), errors, best=step)
    return kept
