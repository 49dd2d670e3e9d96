"""LoRA-SB (Ponkshe et al. 2024): LoRA-XS's shape, bases from an approximation of the first full step.

W = W0 + B R A with B (d_out x r) and A (r x d_in) frozen and only the r x r core R trained. The init
sums the full-weight gradient G of each adapted layer over some examples, approximates the first Adam
step as -sign(G), and takes its top-r singular vectors: B = U_r, A = V_rᵀ. Both are orthonormal, so
∂L/∂R = Bᵀ G Aᵀ maps into ΔW isometrically and the scale is s = 1 (the paper's α = r; `alpha` is unused).

Federated and private (METHODS.md card 10): the bases must be identical on every client, so the server
computes them once before round 1 and sends them with the global state; clients send only R, and
averaging R is exactly averaging ΔW. Reading G touches data, so run config `init-data` says whose:
"public" (a split the server holds; no privacy cost) or "private" (each client takes one DP-SGD step's
noisy clipped gradient, charged to its ledger and included in its noise calibration).
Decisions: R starts at 0, so round 1 starts at W0 (the paper sets R from the first step's singular
values, i.e. applies that step; the bases carry the information, the step size is the optimizer's).
Until the init replaces them (and for unit tests) the bases are the top-r singular vectors of W0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.core_basis import CoreBasisLinear
from common.adapters.decompositions import truncated_svd


@dataclass(frozen=True)
class LoRASBConfig:
    rank: int = 8
    target_modules: tuple[str, ...] = ("query", "value")


def lora_sb_linear(base: nn.Linear, config: LoRASBConfig, name: str) -> CoreBasisLinear:
    u, _, vh = truncated_svd(base.weight.detach(), config.rank)
    return CoreBasisLinear(base, left=u, right=vh, scaling=1.0)


def bases_from_gradient(gradient: torch.Tensor, config: LoRASBConfig) -> dict[str, torch.Tensor]:
    """The layer's frozen factors from its summed full-weight gradient: top-r SVD of -sign(G)."""
    u, _, vh = truncated_svd(-torch.sign(gradient), config.rank)
    return {"frozen_B.weight": u, "frozen_A.weight": vh}
