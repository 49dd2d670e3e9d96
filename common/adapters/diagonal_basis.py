"""Frozen bases around a trainable diagonal: W = W0 + Left diag(δ) Right, δ starting at 0.

SVFit (Left = U_r, Right = V_rᵀ) and LoLDU (Left = P L_r, Right = U_r) differ only in the bases.
ΔW is linear in δ, so averaging δ is exactly averaging ΔW; r numbers per layer travel.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.base import AdapterLayer, frozen_linear
from common.adapters.diagonal import DiagonalScale


class DiagonalBasisLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, left: torch.Tensor, right: torch.Tensor):
        super().__init__(base)
        self.frozen_right = frozen_linear(right, base)  # r x d_in
        self.lora_S = DiagonalScale(right.shape[0]).to(device=base.weight.device, dtype=base.weight.dtype)
        self.frozen_left = frozen_linear(left, base)  # d_out x r

    def delta_weight(self) -> torch.Tensor:
        return (self.frozen_left.weight * self.lora_S.weight) @ self.frozen_right.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen_left(self.lora_S(self.frozen_right(x)))


def diagonal_trainable_count(d_out: int, d_in: int, config) -> int:
    """r: one trained value per basis pair."""
    return config.rank
