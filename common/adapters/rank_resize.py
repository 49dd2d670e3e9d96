"""LoRA layers whose rank follows the received tensors: global adapters of another rank than the model's.

Rank-heterogeneous strategies send global adapters whose rank is not the local one: FLoRA's stacked
global grows by the clients' ranks every round. `fit_ranks` resizes a model's LoRA factors to the
rank of the tensors it is about to load (the scale alpha / r_max stays, see `common/ranks.py`), and
`fold_into_base` adds a received ΔW = s B A to the frozen base weights (FLoRA's clients train a fresh
LoRA on top of the merged global each round).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.adapters.lora import LoRALinear


def _lora_layers(model: nn.Module, arrays: dict[str, np.ndarray]) -> list[tuple[str, LoRALinear]]:
    """The model's LoRA layers for which `arrays` holds both factors."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LoRALinear)
            and f"{name}.lora_A.weight" in arrays and f"{name}.lora_B.weight" in arrays]


def fit_ranks(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Give each LoRA layer the rank of its factors in `arrays` (values are then set by `load_state`)."""
    for name, layer in _lora_layers(model, arrays):
        rank = arrays[f"{name}.lora_A.weight"].shape[0]
        if rank != layer.lora_A.out_features:
            set_rank(layer, rank)


def set_rank(layer: LoRALinear, rank: int) -> None:
    """New zero factors of `rank` (the product starts at 0), same device, dtype and trainability."""
    old_a, old_b = layer.lora_A.weight, layer.lora_B.weight
    layer.lora_A = nn.Linear(layer.base.in_features, rank, bias=False).to(old_a.device, old_a.dtype)
    layer.lora_B = nn.Linear(rank, layer.base.out_features, bias=False).to(old_b.device, old_b.dtype)
    with torch.no_grad():
        layer.lora_A.weight.zero_()
        layer.lora_B.weight.zero_()
    layer.lora_A.weight.requires_grad_(old_a.requires_grad)
    layer.lora_B.weight.requires_grad_(old_b.requires_grad)


@torch.no_grad()
def fold_into_base(model: nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """W0 += s B A for every LoRA layer with factors in `arrays`; return the arrays not folded (the head)."""
    folded = set()
    for name, layer in _lora_layers(model, arrays):
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        weight = layer.base.weight
        b = torch.as_tensor(arrays[b_key], dtype=torch.float64)
        a = torch.as_tensor(arrays[a_key], dtype=torch.float64)
        weight += (layer.scaling * (b @ a)).to(device=weight.device, dtype=weight.dtype)
        folded |= {a_key, b_key}
    return {key: value for key, value in arrays.items() if key not in folded}
