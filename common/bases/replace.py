"""Swap the frozen base `nn.Linear` layers of a loaded model for `QuantizedLinear` (the QLoRA base).

Run it after the adapters are injected (`common.adapters.inject_adapters` only wraps `nn.Linear`s):
each adapter's `base` is quantized in place, every other frozen `nn.Linear` of the backbone too, while
the adapter factors (`lora_A`, `lora_B`, ... inside an adapter layer, frozen or not), any layer with a
trainable parameter (the new classifier head) and the layers named in `keep` stay in full precision.
Embeddings and LayerNorms are not linear layers and stay fp32, as in QLoRA.

Note for adapters whose frozen factors are computed from W0 at wrap time (SVD / LU based ones): those
see the full-precision W0, the forward then uses deq(Q(W0)). For LQ-LoRA the decomposition must run
first and the quantized part becomes the base (see `common.bases.lq_lora`).
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.base import AdapterLayer
from common.bases.blockwise import NF4, BlockQuantConfig
from common.bases.quantized_linear import QuantizedLinear


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def frozen_base_linears(model: nn.Module, keep: tuple[str, ...] = ("classifier",)) -> list[str]:
    """Dotted names of the frozen base linears `quantize_frozen_base` would replace."""
    adapters = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(p.requires_grad for p in module.parameters()):
            continue
        if any(part in keep for part in name.split(".")):
            continue
        owner = next((a for a in adapters if name.startswith(a + ".")), None)
        if owner is None or name == f"{owner}.base":
            names.append(name)
    return names


def quantize_frozen_base(model: nn.Module, config: BlockQuantConfig = NF4,
                         keep: tuple[str, ...] = ("classifier",)) -> list[str]:
    """Replace every frozen base linear by its quantized, buffer-only twin; return the replaced names."""
    names = frozen_base_linears(model, keep)
    for name in names:
        _replace(model, name, QuantizedLinear.from_linear(model.get_submodule(name), config))
    return names


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the linear layers' weights and biases (fp32 nn.Linear or packed QuantizedLinear)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.storage_bytes()
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def dequantize_frozen_base(model: nn.Module) -> list[str]:
    """Replace every `QuantizedLinear` by a frozen `nn.Linear` holding deq(Q) (to merge an adapter into it)."""
    names = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for name in names:
        quantized = model.get_submodule(name)
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None)
        linear.to(device=quantized.codes.device, dtype=quantized.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(quantized.weight)
            if quantized.bias is not None:
                linear.bias.copy_(quantized.bias)
        _replace(model, name, linear.requires_grad_(False))
    return names
