"""CoDyRA (Lu et al. 2024, "Continual Dynamic Rank-Selective LoRA"): LoRA with a rank-importance weight w
on its rank dimension, made sparse by a proximal L1 step, so each layer keeps only the ranks it needs.

  h = W0 x + B diag(w) A x        (s = 1: `alpha` is ignored; w carries the scale)

A and B are LoRA's (A seeded Kaiming-uniform, B = 0, so a fresh layer is W0); w ~ N(0, 1) seeded by
(seed, layer name), as the reference code's `torch.randn(1, r)` (fedlora seeds it so every party builds the
same start). w trains with A and B under DP-SGD (a `DiagonalScale`, whose Opacus sampler gives its per-sample
gradient Σ_t (Bᵀδ_t)_i (A x_t)_i); after each optimizer step it takes the soft-threshold of the scheduled
threshold τ_t (`common/training/codyra.py`): parameters only, so post-processing, no privacy cost.

How it differs from SoRA (`sora.py`, the same B diag(g) A): w starts random, not at ones; no α/r; the
threshold is not lr·λ but the reference's schedule (a dense phase, then a staircase up to `codyra-kappa`).
A rank whose w reached 0 adds nothing; `pruned_codyra` gives the plain LoRA (scale 1) of the surviving
ranks, which is what CoDyRA merges into W0 after a task. Continual learning itself (merge after each task,
a fresh adapter for the next) is not built: a fedlora run is one task, and export merges ΔW into W0.
Each rank is a unit w switches on or off, so strategies that re-factor B A into new ranks are refused
(`rank_identity_matters`), as for SoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.diagonal import DiagonalScale
from common.adapters.lora import LoRAConfig, LoRALinear, seed_for


class CoDyRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, config: LoRAConfig, name: str):
        super().__init__(base, config, name)
        self.codyra_gate = DiagonalScale(config.rank)
        generator = torch.Generator().manual_seed(seed_for(config.seed, f"{name}/codyra-gate"))
        with torch.no_grad():
            self.codyra_gate.weight.copy_(torch.randn(config.rank, generator=generator))
        self.codyra_gate.to(device=base.weight.device, dtype=base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B diag(w) A."""
        return self.scaling * (self.lora_B.weight * self.codyra_gate.weight) @ self.lora_A.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.codyra_gate(self.lora_A(self.dropout(x)))
        if self.rank_mask is not None:
            hidden = hidden * self.rank_mask
        return self.scaling * self.lora_B(hidden)


def codyra_config(c) -> LoRAConfig:
    """LoRA's config at alpha = rank (s = 1), with the run's `lora-dropout`; `c` is the run config."""
    return LoRAConfig(rank=c.rank, alpha=float(c.rank), dropout=c.lora_dropout, target_modules=c.target_module_names,
                      seed=c.seed)


def pruned_codyra(layer: CoDyRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the equivalent plain LoRA (same scale s): the ranks with w_i != 0, w folded into B."""
    w = layer.codyra_gate.weight.detach()
    keep = w != 0
    return layer.lora_A.weight.detach()[keep], layer.lora_B.weight.detach()[:, keep] * w[keep]


def codyra_trainable_count(d_out: int, d_in: int, config: LoRAConfig) -> int:
    """LoRA's r (d_in + d_out) plus the r importance weights."""
    return config.rank * (d_in + d_out + 1)
