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

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank, frozen_linear
from common.adapters.decompositions import truncated_svd


@dataclass(frozen=True)
class LoRAXSConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")


class LoRAXSLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: LoRAXSConfig, name: str):
        super().__init__(base)
        self.scaling = config.scaling
        b, a = truncated_svd_factors(base.weight.detach(), config.rank)
        self.frozen_A = frozen_linear(a, base)
        self.lora_R = nn.Linear(config.rank, config.rank, bias=False)
        self.lora_R.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.lora_R.weight.zero_()
        self.frozen_B = frozen_linear(b, base)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.frozen_B.weight @ self.lora_R.weight @ self.frozen_A.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.frozen_B(self.lora_R(self.frozen_A(x)))


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r Σ_r, V_rᵀ) of `weight` in float32, signs as in `truncated_svd`."""
    u, s, vh = truncated_svd(weight, rank)
    return u * s, vh


def lora_xs_trainable_count(d_out: int, d_in: int, config: LoRAXSConfig) -> int:
    """r²: only the core R trains."""
    return config.rank * config.rank
