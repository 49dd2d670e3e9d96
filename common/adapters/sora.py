"""SoRA (Ding et al. 2023, "Sparse Low-rank Adaptation"): LoRA with a gate g on its rank dimension.

  h = W0 x + s B diag(g) A x,   s = alpha / r,

with A, B as LoRA's (A seeded Kaiming-uniform, B = 0) and g in R^r. g trains with A and B under DP-SGD
(a `DiagonalScale`, whose registered Opacus sampler gives its per-sample gradient sum_t (Bᵀδ_t)_i (A x_t)_i);
after each optimizer step the gate takes the proximal step of the L1 penalty λ‖g‖₁,
g <- sign(g) max(|g| - η λ, 0) (`common/training/prox.py`, η = `lr`, λ = `sora-lambda`), which acts on
parameters only and so is post-processing of the privatized gradient: no privacy cost. A rank whose gate
reached 0 contributes nothing; `pruned_lora` turns the layer into a plain LoRA of rank |{i: g_i != 0}|.

Decisions (the card marks them "unsure"): g starts at ones, so a fresh SoRA is exactly LoRA; the α/r scale
is kept (the paper drops it because g can absorb it) so that the same `lr` and `alpha` mean the same as for
LoRA; the gate's gradient step is the run's update rule (Adam by default, as the reference SparseAdamW),
the threshold η λ is applied after it. Each rank is a unit the gate switches on or off, so strategies that
re-factor B A into new ranks (FedSVD's SVD, FlexLoRA, LoRA-LEGO) are refused (`rank_identity_matters`):
they would rotate the ranks under the gates, and their SVD of B A ignores g.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.diagonal import DiagonalScale
from common.adapters.lora import LoRAConfig, LoRALinear


class SoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, config: LoRAConfig, name: str):
        super().__init__(base, config, name)
        self.sora_gate = DiagonalScale(config.rank)
        with torch.no_grad():
            self.sora_gate.weight.fill_(1.0)
        self.sora_gate.to(device=base.weight.device, dtype=base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B diag(g) A."""
        return self.scaling * (self.lora_B.weight * self.sora_gate.weight) @ self.lora_A.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.sora_gate(self.lora_A(self.dropout(x)))
        if self.rank_mask is not None:
            hidden = hidden * self.rank_mask
        return self.scaling * self.lora_B(hidden)


def pruned_lora(layer: SoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the equivalent plain LoRA (same scale s): the ranks with g_i != 0, g folded into B."""
    keep = layer.sora_gate.weight.detach() != 0
    return (layer.lora_A.weight.detach()[keep],
            layer.lora_B.weight.detach()[:, keep] * layer.sora_gate.weight.detach()[keep])


def sora_trainable_count(d_out: int, d_in: int, config: LoRAConfig) -> int:
    """LoRA's r (d_in + d_out) plus the r gates."""
    return config.rank * (d_in + d_out + 1)
