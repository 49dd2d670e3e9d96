"""LoRA-Pro (Wang et al. 2024, card 22): adjust the private gradients of each LoRA pair so that the step they
take on W = W0 + s B A is the closest one to a full fine-tuning step, then take Adam's step on them.

Stepping (A, B) along (g_A', g_B') moves W along the equivalent gradient g̃ = s (B g_A' + g_B' A). For the
full-weight gradient g (never formed: g_A = s Bᵀ g, g_B = s g Aᵀ), min ‖g̃ − g‖_F is attained by

  g_A' = K_A + X A,   g_B' = K_B − B X,   K_A = (1/s²)(BᵀB)⁻¹ g_A,   K_B = (1/s²)(I − P_B) g_B (AAᵀ)⁻¹,

for every r x r matrix X, and then g̃ = P_B g + g P_A − P_B g P_A (P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A): the
projection of g onto the matrices reachable from B A in one step. X only moves (g_A', g_B') along directions
that leave g̃ unchanged; it is chosen to keep them closest to (g_A, g_B), the Sylvester equation

  BᵀB X + X AAᵀ = (g_A − K_A) Aᵀ − Bᵀ g_B,

solved in the eigenbases of the two r x r Gram matrices. When g_A, g_B come from one g (g_A Aᵀ = Bᵀ g_B) its
right side is the paper's −K_A Aᵀ; under DP they are noised separately and no such g exists, and this general
form is still the exact minimizer. Adam (torch's, moments of A's and B's shapes: the reference's memory-light
variant) then steps on (g_A', g_B'); every other tensor takes the plain Adam step.

Under DP-SGD the correction reads only the privatized gradient (`before_update`, after Opacus' clipping and
noise) and the parameters A, B: post-processing, no privacy cost. It must never run per sample before
clipping. Inverses are pseudo-inverses of the Gram matrices (eigenvalues below `RTOL` x the largest are
dropped): LoRA starts at B = 0, where BᵀB = 0, P_B = 0 and g_A' = g_A P_A. (The reference's damped
(BᵀB + 1e-8 I)⁻¹ would divide A's gradient by 1e-8 there, and under DP that gradient is pure noise.)
With one factor trained (FFA-LoRA and FedSVD freeze A) the same least squares gives g_B' = K_B with P_B = 0,
i.e. (1/s²) g_B (AAᵀ)⁻¹, or g_A' = K_A: the frozen partner is read from the layer.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.lora import LoRALinear
from common.errors import ConfigError
from common.training.pieces import StepPiece

RTOL = 1e-10  # on the float64 eigenvalues of BᵀB and AAᵀ (singular values below 1e-5 x the largest)
# The adapters whose trained layers are all plain `LoRALinear` pairs, W = W0 + s B A (LoRA-Pro, LoRA-GGPO)
PLAIN_LORA = ("lora", "diffora")


def gram_eig(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (those below RTOL x the largest set to 0) and eigenvectors of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh(gram)
    cutoff = RTOL * values.max().clamp(min=0)
    return torch.where(values > cutoff, values, torch.zeros_like(values)), vectors


def pseudo_inverse(values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    inverse = torch.where(values > 0, 1.0 / values.clamp(min=torch.finfo(values.dtype).tiny), torch.zeros_like(values))
    return (vectors * inverse) @ vectors.T


def solve_sylvester(b_eig, a_eig, rhs: torch.Tensor) -> torch.Tensor:
    """The minimum-norm X with BᵀB X + X AAᵀ = rhs, from the eigen-decompositions of BᵀB and AAᵀ."""
    (lam, u), (mu, v) = b_eig, a_eig
    denominator = lam.unsqueeze(1) + mu.unsqueeze(0)
    inverse = torch.where(denominator > 0, 1.0 / denominator.clamp(min=torch.finfo(denominator.dtype).tiny),
                          torch.zeros_like(denominator))
    return u @ ((u.T @ rhs @ v) * inverse) @ v.T


def lora_pro_gradients(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor | None, grad_b: torch.Tensor | None,
                       scaling: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(g_A', g_B') for A (r x n), B (m x r) and their gradients (None: that factor is frozen), in float64."""
    a, b = a.double(), b.double()
    s2 = scaling**2
    b_eig, a_eig = gram_eig(b.T @ b), gram_eig(a @ a.T)
    if grad_a is None:
        return None, grad_b.double() @ pseudo_inverse(*a_eig) / s2
    bb_inv = pseudo_inverse(*b_eig)
    k_a = bb_inv @ grad_a.double() / s2
    if grad_b is None:
        return k_a, None
    grad_a, grad_b = grad_a.double(), grad_b.double()
    k_b = (grad_b - b @ (bb_inv @ (b.T @ grad_b))) @ pseudo_inverse(*a_eig) / s2
    x = solve_sylvester(b_eig, a_eig, (grad_a - k_a) @ a.T - b.T @ grad_b)
    return k_a + x @ a, k_b - b @ x


def equivalent_gradient(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor | None, grad_b: torch.Tensor | None,
                        scaling: float) -> torch.Tensor | None:
    """g̃ = s (B g_A + g_B A): the direction W = W0 + s B A moves along when (A, B) step along (g_A, g_B); a
    frozen factor (gradient None) contributes nothing, and None when both are."""
    parts = [b @ grad_a if grad_a is not None else None, grad_b @ a if grad_b is not None else None]
    parts = [p for p in parts if p is not None]
    return scaling * sum(parts) if parts else None


class LoRAProCorrection(StepPiece):
    """Before the update: p.grad of every plain `LoRALinear` pair <- LoRA-Pro's (g_A', g_B')."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if type(m) is LoRALinear
                       and (m.lora_A.weight.requires_grad or m.lora_B.weight.requires_grad)]
        if not self.layers:
            raise ConfigError("update-rule = 'lora_pro' found no trainable LoRA pair (lora_A, lora_B with "
                              "ΔW = s B A) in this model: use adapter 'lora' or 'diffora', or update-rule 'adam'")

    def before_update(self) -> None:
        for layer in self.layers:
            a, b = layer.lora_A.weight, layer.lora_B.weight
            if a.grad is None and b.grad is None:
                continue
            new_a, new_b = lora_pro_gradients(a.detach(), b.detach(), a.grad, b.grad, layer.scaling)
            for p, g in ((a, new_a), (b, new_b)):
                if g is not None:
                    p.grad.copy_(g.to(p.grad.dtype))
