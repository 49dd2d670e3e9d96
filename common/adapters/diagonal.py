"""A trainable per-coordinate scale, y = x * weight, with its Opacus per-sample gradient sampler.

The building block of adapters that train a diagonal between frozen bases (SVFit, LoLDU, RandLoRA).
Without a registered sampler Opacus would fall back to its slower functorch path.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn


class DiagonalScale(nn.Module):
    """`weight` of any shape scales the last axis of x elementwise, read in `weight`'s row-major order."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.flatten()


@register_grad_sampler(DiagonalScale)
def diagonal_scale_grad_sample(layer: DiagonalScale, activations: list[torch.Tensor], backprops: torch.Tensor
                               ) -> dict[nn.Parameter, torch.Tensor]:
    """d loss_n / d w_i = sum over the example's positions of x_i * (d loss_n / d y_i)."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    return {layer.weight: torch.einsum("n...i,n...i->ni", x, backprops).view(-1, *layer.weight.shape)}
