"""The frozen base a client trains on, as one checksum and one byte count (issue 5, federated semantics).

Every party builds the base from the run config (model, `base` and its settings, seed); the server and
each client hash what they built, and a training reply carries its hash: the server refuses a reply
whose base differs from its own (another BLAS giving another SVD, another model file, another setting).

"Frozen base" = every tensor of the model's state except the trainable ones (head, trained factors) and
the adapter layers' own factors (frozen or not, they travel in the rounds); an adapter's `base` is part of
it. Quantized layers contribute their packed codes and scales, so the hash is of what is actually stored,
and the byte count is what a client holds (or would download once, were the server to ship the base).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from common.adapters.base import AdapterLayer


def frozen_base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of the frozen base, in state-dict order."""
    adapters = [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
    tensors = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.requires_grad:
            continue
        owner = next((a for a in adapters if key.startswith(a + ".")), None)
        if owner is not None and not key.startswith(f"{owner}.base."):
            continue
        tensors[key] = tensor.detach()
    return tensors


def base_checksum(model: nn.Module) -> str:
    """sha256 (hex) over the frozen base tensors: name, dtype, shape and bytes of each, in sorted name order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(frozen_base_tensors(model).items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base tensors (a tensor shared under two names, as tied embeddings, counts once)."""
    seen, total = set(), 0
    for tensor in frozen_base_tensors(model).values():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
