"""Data-driven adapter initialization (LoRA-SB, LoRA-GA): full-weight gradients of the adapted layers, then factors.

The gradient is read either on the server's public split (`public_gradients`, no privacy cost) or on
each client under DP (client/adapter_init.py); either way `frozen_factors_from` turns the summed
gradients into each layer's frozen factors with the run's `gradient_init_of` (LoRA-SB's bases, or LoRA-GA's
start B0, A0 for adapter lora with `lora-init = "lora_ga"`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.adapters.base import AdapterLayer
from common.adapters.registry import get_adapter, gradient_init_of
from common.config import RunConfig
from common.tensors import trim


def train_base_weights_only(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze everything but the base weight of each adapter layer; {layer name: that weight}.

    Dropout is switched off: the init reads the pretrained model's gradient, not one dropout sample of it
    (Opacus needs train mode, so `eval()` alone would not do on the clients).
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.requires_grad_(False)
    weights = {name: module.base.weight for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
    for weight in weights.values():
        weight.requires_grad_(True)
    return weights


def public_gradients(model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device
                     ) -> dict[str, torch.Tensor]:
    """Mean cross-entropy gradient of every adapted layer's base weight over `data` (eval mode)."""
    weights = train_base_weights_only(model)
    model.to(device).eval()
    for input_ids, attention_mask, labels in DataLoader(data, batch_size=batch_size):
        input_ids, attention_mask = trim(input_ids, attention_mask)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        (F.cross_entropy(logits, labels.to(device), reduction="sum") / len(data)).backward()
    gradients = {name: weight.grad.detach().cpu() for name, weight in weights.items()}
    model.requires_grad_(False)
    return gradients


def frozen_factors_from(config: RunConfig, gradients: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The global-state arrays of every layer's data-initialized frozen factors."""
    adapter_config = get_adapter(config.adapter).make_config(config)
    gradient_init = gradient_init_of(config)
    arrays = {}
    for layer, gradient in gradients.items():
        for factor, value in gradient_init(gradient.float(), adapter_config).items():
            arrays[f"{layer}.{factor}"] = value.float().numpy()
    return arrays
