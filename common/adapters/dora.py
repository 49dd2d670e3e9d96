"""DoRA (Liu et al. 2024): LoRA's direction update with a separately trained per-row magnitude.

W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖, the norm taken over each output row (d_out values), as PEFT's
`use_dora=True` computes it. m starts at ‖W0‖ and B at 0, so a fresh adapter is the base layer.
As in the paper (sec. 4.3) and PEFT, the norm is treated as a constant in the backward pass (detached):
this keeps the gradient cheap and makes our logits and gradients those of PEFT's DoRA.

Opacus: A and B are LoRA's `nn.Linear` factors (stock grad sampler); the magnitude is a `DiagonalScale`
applied to (W0 x + s B A x) / ‖·‖, so its per-sample gradient is that diagonal's closed form. Named
`lora_magnitude_vector` like PEFT's parameter, so the PEFT export copies it by name.
Federated: A, B and m travel; the update is not linear in them, so averaging is not exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.adapters.base import RemembersMergedDelta
from common.adapters.diagonal import DiagonalScale
from common.adapters.lora import LoRAConfig, LoRALinear


class DoRALinear(RemembersMergedDelta, LoRALinear):
    def __init__(self, base: nn.Linear, config: LoRAConfig, name: str):
        super().__init__(base, config, name)
        self.lora_magnitude_vector = DiagonalScale(base.out_features)
        self.lora_magnitude_vector.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.lora_magnitude_vector.weight.copy_(self.weight_norm())
        self._merged_delta: torch.Tensor | None = None  # ΔW folded in by `merge`, exact for `unmerge`

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s B A‖ per output row; valid while unmerged (the base weight is W0)."""
        return torch.linalg.norm(self.base.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight, dim=1)

    def delta_weight(self) -> torch.Tensor:
        if self.merged:
            return self._merged_delta
        direction = self.base.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight
        return (self.lora_magnitude_vector.weight / self.weight_norm())[:, None] * direction - self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        direction = F.linear(x, self.base.weight) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))
        out = self.lora_magnitude_vector(direction / self.weight_norm().detach())
        return out if self.base.bias is None else out + self.base.bias

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) - self.base(x)


def dora_trainable_count(d_out: int, d_in: int, config: LoRAConfig) -> int:
    """LoRA's r (d_in + d_out) plus one magnitude per output row."""
    return config.rank * (d_in + d_out) + d_out
