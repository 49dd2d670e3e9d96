"""Frozen bases around a trainable r x r core: W = W0 + s · Left · R · Right, R starting at 0.

LoRA-XS (Left = U_r Σ_r), LaMDA (Left = U_r) and LoRA-SB (bases from a first-step gradient) differ
only in the frozen bases. ΔW is linear in R, so averaging the clients' cores is exactly averaging
their ΔW, and only r² numbers per layer travel. Three chained `nn.Linear`s: Opacus's stock sampler.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.base import AdapterLayer, frozen_linear


class CoreBasisLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, left: torch.Tensor, right: torch.Tensor, scaling: float):
        super().__init__(base)
        self.scaling = scaling
        rank = right.shape[0]
        self.frozen_A = frozen_linear(right, base)  # r x d_in
        self.lora_R = nn.Linear(rank, rank, bias=False)
        self.lora_R.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.lora_R.weight.zero_()
        self.frozen_B = frozen_linear(left, base)  # d_out x r

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.frozen_B.weight @ self.lora_R.weight @ self.frozen_A.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.frozen_B(self.lora_R(self.frozen_A(x)))


def core_trainable_count(d_out: int, d_in: int, config) -> int:
    """r²: only the core R trains."""
    return config.rank * config.rank
