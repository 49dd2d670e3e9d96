"""Full-weight training as an adapter: W = W0 + ΔW with a dense, trainable ΔW (d_out x d_in), zero at start.

The full-parameter procedures of the seed (LISA and OwLore's layer sampling, GaLore and FRUGAL on whole
matrices: METHODS.md cards 29, 46, 47, 49) train the weights themselves. Holding the change as a separate
ΔW instead of unfreezing W0 keeps everything fedlora already does for adapters: only ΔW travels (W0 is
loaded by every party), ΔW is linear, so averaging the clients' ΔW is exactly averaging their weights
(`fedavg_lora`), merge / export fold it into W0, and a frozen base (NF4) stays frozen underneath.

ΔW is an `nn.Linear` without bias, so Opacus computes its per-sample gradients with its own einsum grad
sampler (x_t g_tᵀ summed over tokens), and ghost clipping could take it as it is. The payload is the whole
matrix: 4 d_out d_in bytes a layer, which is why `layer-sampling` (LISA, OwLore) sends only the sampled
layers' ΔW each round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer


FULL_FACTOR = "full_delta"  # the trained sub-module's name: payload keys end in "full_delta.weight"


@dataclass(frozen=True)
class FullConfig:
    target_modules: tuple[str, ...] = ("query", "value")


class FullLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: FullConfig, name: str):
        super().__init__(base)
        self.full_delta = nn.Linear(base.in_features, base.out_features, bias=False,
                                    device=base.weight.device, dtype=base.weight.dtype)
        nn.init.zeros_(self.full_delta.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.full_delta.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.full_delta(x)


def full_trainable_count(d_out: int, d_in: int, config: FullConfig) -> int:
    """d_out d_in: the whole matrix."""
    return d_out * d_in
