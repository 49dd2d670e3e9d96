"""A frozen linear layer whose weight is stored quantized and dequantized on the fly (the QLoRA base).

The module owns buffers only (packed codes, scales, bias) and no parameters. That is what Opacus needs:
a module owning a trainable parameter may own no buffers, so the LoRA factors must live in separate
sub-modules (`common.adapters` wraps this module as `base`, exactly as it wraps an `nn.Linear`).

It stores the weight in our own packed uint8 format (`common.bases.blockwise`), not in bitsandbytes'
`Linear4bit`: that one keeps the weight as a frozen `Params4bit` parameter, supports only 4 bits, and
LQ-LoRA's mixed configurations need 2, 3 and 8 bits too. For 4 bits our bytes equal bitsandbytes'.

`weight` is a read-only property returning the dequantized matrix, so adapters that read
`base.weight` (device, dtype, SVD-based initializations) work unchanged. Merging an adapter into a
quantized base is not defined (it would need re-quantization): assigning `weight` raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.bases.blockwise import NF4, BlockQuantConfig, QuantizedTensor, dequantize, quantize

_TENSORS = ("codes", "absmax", "scale_absmax", "scale_offset")


class QuantizedLinear(nn.Module):
    """y = x deq(Q)ᵀ + b with Q frozen and stored packed; no trainable parameters."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.config = q.config
        self.compute_dtype = dtype
        for name, tensor in q.tensors().items():
            self.register_buffer(name, tensor.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().to(dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: BlockQuantConfig = NF4) -> "QuantizedLinear":
        """Quantize an `nn.Linear`'s weight; keep its bias in full precision (it is d_out floats)."""
        layer = cls(quantize(linear.weight, config), linear.bias, dtype=linear.weight.dtype)
        return layer.to(linear.weight.device)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: BlockQuantConfig = NF4) -> "QuantizedLinear":
        return cls(quantize(weight, config), bias, dtype=weight.dtype).to(weight.device)

    def quantized(self) -> QuantizedTensor:
        """The stored tensors (on the module's current device) as a `QuantizedTensor`."""
        tensors = {name: getattr(self, name) for name in _TENSORS}
        return QuantizedTensor(**tensors, shape=(self.out_features, self.in_features), config=self.config)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (d_out x d_in), recomputed on every access; never stored."""
        return dequantize(self.quantized()).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes held by this module's buffers (codes, scales and bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={c.bits}, "
                f"block_size={c.block_size}, scale_bits={c.scale_bits}, bias={self.bias is not None}")
