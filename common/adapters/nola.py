"""NOLA (Koohpayegani et al. 2024): LoRA factors as combinations of seeded random bases.

A = Σ_i α_i A_i and B = Σ_j β_j B_j with k frozen random bases each (A_i: r x d_in, B_j: d_out x r)
drawn from a generator seeded by (seed, module name), so every party rebuilds them and only the 2k
coefficients travel, whatever the rank. ΔW = s B A with s = alpha / r. β starts at 0 (ΔW = 0) and
α at seeded random values (with α = 0 too, no gradient would ever reach β). ΔW is bilinear in (α, β),
so averaging the coefficients is not exact, as for plain LoRA's factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank
from common.adapters.lora import seed_for


@dataclass(frozen=True)
class NOLAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    num_bases: int = 64
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


class BasisCombination(nn.Module):
    """y = (Σ_k c_k W_k) x with frozen bases W_k (a frozen Parameter, not a buffer) and trainable c."""

    def __init__(self, bases: torch.Tensor, coefficients: torch.Tensor):
        super().__init__()
        self.bases = nn.Parameter(bases, requires_grad=False)  # k x out x in
        self.weight = nn.Parameter(coefficients)  # k

    def matrix(self) -> torch.Tensor:
        return torch.einsum("k,koi->oi", self.weight, self.bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix().T


@register_grad_sampler(BasisCombination)
def basis_combination_grad_sample(layer: BasisCombination, activations: list[torch.Tensor],
                                  backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """d loss_n / d c_k = Σ_t backprop_tᵀ W_k x_t = <per-example weight gradient, W_k>."""
    x = activations[0].to(backprops.dtype)
    weight_grads = torch.einsum("n...o,n...i->noi", backprops, x)
    return {layer.weight: torch.einsum("noi,koi->nk", weight_grads, layer.bases)}


class NOLALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: NOLAConfig, name: str):
        super().__init__(base)
        self.scaling = config.scaling
        generator = torch.Generator().manual_seed(seed_for(config.seed, name))
        k, r, d_in, d_out = config.num_bases, config.rank, base.in_features, base.out_features
        bases_a = torch.empty(k, r, d_in).uniform_(-1, 1, generator=generator) / math.sqrt(d_in)
        bases_b = torch.empty(k, d_out, r).uniform_(-1, 1, generator=generator) / math.sqrt(r)
        alpha0 = torch.empty(k).uniform_(-1, 1, generator=generator) / math.sqrt(k)
        self.nola_A = BasisCombination(bases_a, alpha0)
        self.nola_B = BasisCombination(bases_b, torch.zeros(k))
        self.nola_A.to(device=base.weight.device, dtype=base.weight.dtype)
        self.nola_B.to(device=base.weight.device, dtype=base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.nola_B.matrix() @ self.nola_A.matrix()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.nola_B(self.nola_A(x))


def nola_trainable_count(d_out: int, d_in: int, config: NOLAConfig) -> int:
    """2k coefficients, independent of rank and layer size."""
    return 2 * config.num_bases
