"""SaRA (Hu et al. 2024, METHODS.md card 31) as an adapter: train the smallest-magnitude entries of W0, sparsely.

  W = W0 + scatter(Ω, δ),   Ω = the k = round(ρ d_out d_in) positions of smallest |W0|,   δ ∈ R^k, δ = 0 at start.

Ω depends on W0 only (data-free, no privacy cost), and every party loads the same pretrained W0, so every
party computes the same Ω: the indices never travel, only the k values of δ (a fraction ρ of the dense
weight's bytes). ΔW is linear in δ on one shared Ω, so averaging the clients' δ is exactly averaging their
ΔW (`fedavg_lora`); strategies built on LoRA's A and B refuse it through the registry.

DP: δ's per-example gradient is (Σ_t g_t x_tᵀ) read at Ω. It reuses SLTrain's `SparseValues` and its
registered Opacus grad sampler (`sltrain.py`): a batched matmul of a few examples at a time read at Ω for
layers up to 2^24 entries, a gather on Ω for larger ones (memory bounded either way).

Decisions (the card marks them "unsure"): ρ is run config `sara-density`, default 0.1 (the card's
10-20%); at least one position per layer; ties in |W0| go to the earlier row-major position (a stable
sort), so parties holding the same W0 bytes agree. Ω is computed on the full-precision W0 when the
adapter is injected, before a base is quantized (`common/model.py`). Not built: the nuclear-norm
regularizer (a post-step prox on the private gradient would be free, but its SVD of every scattered ΔW
each step is not needed for a first version) and the progressive re-mask (the server would recompute Ω
on the global weights mid-run, and every client would need the new Ω before its next round).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer
from common.adapters.sltrain import SparseValues, support_size


@dataclass(frozen=True)
class SaRAConfig:
    density: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")


def smallest_magnitude_support(weight: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the `support_size` smallest |W0| entries, in row-major order; ties by position."""
    d_out, d_in = weight.shape
    order = torch.argsort(weight.detach().abs().flatten().cpu(), stable=True)
    flat = order[: support_size(d_out, d_in, density)].sort().values
    return flat // d_in, flat % d_in


class SaRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: SaRAConfig, name: str):
        super().__init__(base)
        d_out, d_in = base.out_features, base.in_features
        rows, cols = smallest_magnitude_support(base.weight, config.density)
        self.sara_delta = SparseValues(rows, cols, d_out, d_in).to(device=base.weight.device, dtype=base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.sara_delta.dense()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.sara_delta(x)


def sara_trainable_count(d_out: int, d_in: int, config: SaRAConfig) -> int:
    """k = round(ρ d_out d_in) values: the whole payload of the layer."""
    return support_size(d_out, d_in, config.density)
