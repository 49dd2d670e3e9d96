"""SVFit: train only the top-r singular values of W0, its singular vectors frozen.

W = W0 + U_r diag(δ) V_rᵀ, where W0 = U Σ Vᵀ and δ = s - σ_r is the change of the top-r singular
values (the paper trains s starting at σ_r; δ starting at 0 is the same model and the same DP-SGD
gradients, and makes the payload a plain update). ΔW is linear in δ, so averaging δ is exactly
averaging ΔW; r numbers per layer travel. U_r and V_r come from a float64 CPU SVD with canonical signs,
so every party rebuilds them identically from the shared base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, frozen_linear
from common.adapters.diagonal import DiagonalScale
from common.adapters.lora_xs import truncated_svd


@dataclass(frozen=True)
class SVFitConfig:
    rank: int = 8
    target_modules: tuple[str, ...] = ("query", "value")


class SVFitLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: SVFitConfig, name: str):
        super().__init__(base)
        u, _, vh = truncated_svd(base.weight.detach(), config.rank)
        self.frozen_V = frozen_linear(vh, base)
        self.lora_S = DiagonalScale(config.rank).to(device=base.weight.device, dtype=base.weight.dtype)
        self.frozen_U = frozen_linear(u, base)

    def delta_weight(self) -> torch.Tensor:
        return (self.frozen_U.weight * self.lora_S.weight) @ self.frozen_V.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen_U(self.lora_S(self.frozen_V(x)))


def svfit_trainable_count(d_out: int, d_in: int, config: SVFitConfig) -> int:
    """r: one value per kept singular direction."""
    return config.rank
