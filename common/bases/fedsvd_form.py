"""Re-factor a low-rank product B A into FedSVD form: the same product, A with orthonormal rows.

LQ-LoRA's Fisher-weighted step and EoRA return factors whose A is not orthonormal; FedSVD (card 41)
freezes A on the clients and wants A Aᵀ = I (so ‖A x‖ <= ‖x‖ bounds B's per-sample gradients). With thin
QRs B = Q_b R_b and Aᵀ = Q_a R_a and the SVD of the r x r core R_b R_aᵀ = U Σ Vᵀ:
B A = (Q_b U Σ)(Q_a V)ᵀ. That costs O((d_out + d_in) r²) and never forms the d_out x d_in product.
It is the torch twin of `server.aggregation.fedsvd_reorthogonalize`, kept in `common` because the
server package must not be a dependency of base construction.
"""

from __future__ import annotations

import torch


def fedsvd_form(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' = B A, A' A'ᵀ = I_r and B' = U_r Σ_r (column norms = singular values of B A).

    Computed in float64, returned in B's dtype. Each pair is signed so the largest-magnitude entry of
    each row of A' is positive (the SVD fixes singular vectors only up to sign).
    """
    dtype = b.dtype
    q_b, r_b = torch.linalg.qr(b.detach().double())
    q_a, r_a = torch.linalg.qr(a.detach().double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    new_b = (q_b @ u) * s
    new_a = vh @ q_a.T
    pivots = new_a.gather(1, new_a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    signs = torch.where(pivots < 0, -1.0, 1.0).to(torch.float64)
    return (new_b * signs).to(dtype), (new_a * signs[:, None]).to(dtype)
