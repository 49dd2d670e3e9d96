"""EoRA (Liu et al. 2024, card 42): training-free low-rank compensation of a compression error E = W - W_c,
optimal for the error on the calibration activations rather than on the weights.

With C = X Xᵀ + eps I = Q Λ Qᵀ (X: d_in x N calibration inputs), E' = E Q Λ^{1/2} and its truncated SVD
U_r Σ_r V_rᵀ, the factors B = U_r Σ_r and A = V_rᵀ Λ^{-1/2} Qᵀ minimise tr((E - BA) C (E - BA)ᵀ) over
rank-r products (Eckart-Young in the whitened space, since ‖M Q Λ^{1/2}‖_F² = tr(M C Mᵀ)); the minimum is
Σ_{i>r} σ_i(E')². For eps = 0 that is ‖(E - BA) X‖_F².

eps decision: `eps` is relative, eps * mean eigenvalue of X Xᵀ is added to the diagonal, so that
rank-deficient calibration sets (N < d_in) still give an invertible Λ; the identity above is exact for
the regularised C. Under DP, X must be public calibration text (it reads data).
Serving is y = W_c x + B (A x); `fedsvd_form(B, A)` re-factors the start state for FedSVD.
"""

from __future__ import annotations

import torch


def activation_eigenbasis(activations: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ^{1/2}, Q) of C = X Xᵀ + eps * mean(diag(X Xᵀ)) I, in float64."""
    x = activations.detach().double()
    return covariance_eigenbasis(x @ x.T, eps)


def covariance_eigenbasis(covariance: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ^{1/2}, Q) of C + eps * mean(diag(C)) I for an accumulated C = X Xᵀ (d_in x d_in), in float64."""
    covariance = covariance.detach().double().clone()
    covariance += eps * covariance.diagonal().mean() * torch.eye(covariance.shape[0], dtype=torch.float64)
    eigenvalues, q = torch.linalg.eigh(covariance)
    return eigenvalues.clamp_min(torch.finfo(torch.float64).tiny).sqrt(), q


def eora(error: torch.Tensor, activations: torch.Tensor, rank: int, eps: float = 1e-6
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A), d_out x r and r x d_in, with B A ≈ E in the eigenspace of the activations (float64 inside).

    error: E = W - W_c (d_out x d_in); activations: X (d_in x N), one calibration input per column.
    """
    if activations.shape[0] != error.shape[1]:
        raise ValueError(f"activations must be d_in x N with d_in = {error.shape[1]}, got {tuple(activations.shape)}")
    x = activations.detach().double()
    return eora_from_covariance(error, x @ x.T, rank, eps)


def eora_from_covariance(error: torch.Tensor, covariance: torch.Tensor, rank: int, eps: float = 1e-6
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`eora` from C = X Xᵀ accumulated over calibration batches instead of X itself (same result)."""
    if covariance.shape != (error.shape[1], error.shape[1]):
        raise ValueError(f"the covariance must be d_in x d_in with d_in = {error.shape[1]}, "
                         f"got {tuple(covariance.shape)}")
    if not 1 <= rank <= min(error.shape):
        raise ValueError(f"rank = {rank} is invalid for a {tuple(error.shape)} error: use 1..{min(error.shape)}")
    root, q = covariance_eigenbasis(covariance, eps)
    u, s, vh = torch.linalg.svd(error.detach().double() @ q * root, full_matrices=False)
    b = u[:, :rank] * s[:rank]
    a = (vh[:rank] / root) @ q.T
    return b.to(error.dtype), a.to(error.dtype)


def projected_singular_values(error: torch.Tensor, activations: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """σ(E Q Λ^{1/2}), the spectrum EoRA truncates (same regularisation as `eora`)."""
    root, q = activation_eigenbasis(activations, eps)
    return torch.linalg.svdvals(error.detach().double() @ q * root)
