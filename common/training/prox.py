"""SoRA's proximal step: the soft-threshold of its rank gates after each optimizer step.

The L1 penalty λ‖g‖₁ is not put in the loss (it would enter the per-sample gradients, be clipped and
noised for no reason): its proximal operator is applied to the parameters after the update,
g <- S_{ηλ}(g) with S_τ(z) = sign(z) max(|z| - τ, 0). It reads only g, never the data or the raw
gradients, so it is post-processing of the privatized update and costs no privacy.
"""

from __future__ import annotations

import torch
from torch import nn

from common.training.pieces import StepPiece


def soft_threshold(z: torch.Tensor, tau: float) -> torch.Tensor:
    """S_τ(z) = sign(z) max(|z| - τ, 0), elementwise."""
    return torch.sign(z) * torch.clamp(z.abs() - tau, min=0.0)


class GateProx(StepPiece):
    """After each update, g <- S_{lr·λ}(g) on every trainable `<...>.sora_gate.weight` of the model."""

    def __init__(self, model: nn.Module, lr: float, sparsity: float):
        self.gates = [p for name, p in model.named_parameters()
                      if p.requires_grad and name.endswith("sora_gate.weight")]
        self.tau = lr * sparsity

    def after_update(self) -> None:
        with torch.no_grad():
            for gate in self.gates:
                gate.copy_(soft_threshold(gate, self.tau))
