"""ALLoRA (Huang & Balestriero 2024, "Adaptive Learning Rate Mitigates LoRA Fatal Flaws"): LoRA without
dropout and without the α/r scale, trained with a per-row step size that shrinks as the row grows.

  h = W0 x + B A x        (s = 1: `alpha` is ignored, as for Bone)

The layer is LoRA's own (A seeded Kaiming-uniform, B = 0), so everything that handles LoRA pairs (merging,
export, FedSVD, FFA-LoRA, rank growth) handles it; what makes it ALLoRA is the step piece
`common/training/allora.py`, which scales each row's update by 1/sqrt(‖row‖² + 1/η²) (`allora-eta`).
Dropout is refused (`lora-dropout` > 0 is a one-line error): the paper's point is that it only regularizes
long runs, and without it DP-SGD's per-sample gradients are deterministic given the batch.
"""

from __future__ import annotations

from torch import nn

from common.adapters.lora import LoRAConfig, LoRALinear


class ALLoRALinear(LoRALinear):
    """A `LoRALinear` built at scale 1 without dropout; its type marks the layers ALLoRA's piece scales."""


def allora_config(c) -> LoRAConfig:
    """LoRA's config at alpha = rank (s = alpha / rank = 1) and no dropout; `c` is the run config."""
    return LoRAConfig(rank=c.rank, alpha=float(c.rank), dropout=0.0, target_modules=c.target_module_names,
                      seed=c.seed)


def allora_linear(base: nn.Linear, config: LoRAConfig, name: str) -> ALLoRALinear:
    return ALLoRALinear(base, config, name)
