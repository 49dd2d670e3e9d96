"""LoRA-XS (Bałazy et al. 2024): W0 x + s * B R A x with B, A frozen from the truncated SVD of W0.

B = U_r Σ_r (d_out x r) and A = V_rᵀ (r x d_in) come from the top-r SVD of the layer's own pretrained
weight, computed in float64 on the CPU with canonical signs, so every party rebuilds identical frozen
factors from the shared base model and nothing but the r x r core R ever travels. ΔW is linear in R,
so averaging the clients' R is exactly averaging their ΔW: any example-weighted mean is exact.
Decisions: R starts at 0 (the paper draws it from a small Gaussian) so training starts exactly at W0;
the scale is s = alpha / r as for LoRA. The gradient of R is nonzero at R = 0 (B and A are not).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.adapters.base import ScaledByAlphaOverRank
from common.adapters.core_basis import CoreBasisLinear
from common.adapters.decompositions import truncated_svd


@dataclass(frozen=True)
class LoRAXSConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")


def lora_xs_linear(base: nn.Linear, config: LoRAXSConfig, name: str) -> CoreBasisLinear:
    u, s, vh = truncated_svd(base.weight.detach(), config.rank)
    return CoreBasisLinear(base, left=u * s, right=vh, scaling=config.scaling)
