"""Blockwise absmax quantization with a NormalFloat codebook and optional double quantization.

QLoRA (Dettmers et al. 2023, Sec. 3): flatten W row-major, cut it into blocks of B0 values, divide each
block by its absmax c, round every value to the nearest code of NF-b0, store the b0-bit indices and c.
Double quantization stores the scales c themselves in b1 = 8 bits: subtract their mean, then quantize
them blockwise (blocks of B1) with the 8-bit dynamic code, keeping one fp32 absmax per B1 block. The
storage per weight is then `b0 + b1/B0 + 32/(B0*B1)` bits (LQ-LoRA, Sec. 3.1), or `b0 + 32/B0` without
double quantization; the one fp32 scalar per matrix (the mean of the scales, kept as 0 without double
quantization) is left out of the formula (it adds 32/numel).

Layout decisions, chosen so that 4-bit tensors are byte-identical to bitsandbytes' `quantize_4bit`
(`tests/test_bases_quant.py` checks it): rounding is `bucketize` on the midpoints between adjacent codes
(a tie goes to the lower code), a partial last block gets its own absmax, and b-bit indices are packed
MSB first into a uint8 bit stream (for 4 bits: first index in the high nibble). Any b0 in 2..8 packs
densely (3 bits use 3/8 byte per weight), so memory really drops.

Error bound without double quantization: every |w - deq(q(w))| in a block is at most
c * max_half_gap(code), since the normalised values lie in [-1, 1] and the code spans [-1, 1]. With
double quantization the scale error adds |c - ĉ| (the codes have |value| <= 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from common.bases.codebooks import dynamic_code_8bit, normal_float_code

SCALE_BITS = (0, 8)


@dataclass(frozen=True)
class BlockQuantConfig:
    """How one matrix is quantized.

    Parameters
    ----------
    bits : int, default 4
        b0, bits per weight (NF-b0 codebook), 2..8.
    block_size : int, default 64
        B0, weights per absmax scale.
    scale_bits : int, default 8
        b1: 0 keeps the scales in fp32; 8 double-quantizes them with the 8-bit dynamic code.
    scale_block_size : int, default 256
        B1, scales per fp32 second-level absmax (only used when scale_bits = 8).
    """

    bits: int = 4
    block_size: int = 64
    scale_bits: int = 8
    scale_block_size: int = 256

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits = {self.bits} is invalid: NormalFloat quantization supports 2..8 bits")
        if self.block_size < 1 or self.scale_block_size < 1:
            raise ValueError(f"block sizes must be >= 1, got {self.block_size} and {self.scale_block_size}")
        if self.scale_bits not in SCALE_BITS:
            raise ValueError(f"scale_bits = {self.scale_bits} is invalid: use 0 (fp32 scales) or 8 (double quant)")

    @property
    def bits_per_param(self) -> float:
        """Storage per weight: b0 + b1/B0 + 32/(B0*B1) with double quantization, b0 + 32/B0 without."""
        if self.scale_bits == 0:
            return self.bits + 32 / self.block_size
        return self.bits + self.scale_bits / self.block_size + 32 / (self.block_size * self.scale_block_size)


NF4 = BlockQuantConfig(bits=4, block_size=64, scale_bits=8, scale_block_size=256)


@dataclass
class QuantizedTensor:
    """The stored form of one quantized matrix; `dequantize` turns it back into float32."""

    codes: torch.Tensor               # uint8, b0-bit indices packed MSB first
    absmax: torch.Tensor              # float32 per block, or uint8 codes of the scales when double-quantized
    scale_absmax: torch.Tensor        # float32 per B1 block of scales (empty without double quant)
    scale_offset: torch.Tensor        # float32 scalar mean of the scales (0 without double quant)
    shape: tuple[int, ...]
    config: BlockQuantConfig

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("shape", "config")}

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def storage_bits(self) -> float:
        """Measured bits per weight: every stored byte (codes, scales, offsets) over the weight count."""
        total = sum(t.numel() * t.element_size() for t in self.tensors().values())
        return 8.0 * total / self.numel


def pack_codes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit indices (values < 2^bits) MSB first into a dense uint8 stream."""
    indices = indices.reshape(-1).to(torch.uint8)
    if bits == 8:
        return indices.clone()
    if bits == 4:
        padded = F.pad(indices, (0, indices.numel() % 2))
        return (padded[::2] << 4) | padded[1::2]
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8)
    stream = ((indices[:, None] >> shifts) & 1).reshape(-1)
    stream = F.pad(stream, (0, (-stream.numel()) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` indices, as int64 (for indexing a codebook)."""
    if bits == 8:
        return packed[:count].long()
    if bits == 4:
        return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:count].long()
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits].reshape(count, bits)
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=packed.device)
    return (stream.long() * weights).sum(dim=1)


def blockwise_absmax_quantize(values: torch.Tensor, block_size: int, code: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest code per value, absmax per block) for a flat float32 tensor."""
    count = values.numel()
    blocks = F.pad(values, (0, (-count) % block_size)).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:count]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device)), absmax


def blockwise_dequantize(indices: torch.Tensor, absmax: torch.Tensor, block_size: int, code: torch.Tensor
                         ) -> torch.Tensor:
    """code[index] * absmax of its block, flat float32."""
    count = indices.numel()
    values = F.pad(code.to(absmax.device)[indices], (0, (-count) % block_size)).reshape(-1, block_size)
    return (values * absmax[:, None]).reshape(-1)[:count]


def quantize(weight: torch.Tensor, config: BlockQuantConfig = NF4) -> QuantizedTensor:
    """Blockwise NF-b0 quantization of `weight` (any shape), with double-quantized scales if configured."""
    flat = weight.detach().reshape(-1).float()
    code = normal_float_code(config.bits).to(flat.device)
    indices, absmax = blockwise_absmax_quantize(flat, config.block_size, code)
    empty = torch.zeros(0, dtype=torch.float32, device=flat.device)
    offset = torch.zeros((), dtype=torch.float32, device=flat.device)
    if config.scale_bits == 8:
        offset = absmax.mean()
        scale_indices, scale_absmax = blockwise_absmax_quantize(
            absmax - offset, config.scale_block_size, dynamic_code_8bit().to(flat.device))
        absmax, empty = scale_indices.to(torch.uint8), scale_absmax
    return QuantizedTensor(codes=pack_codes(indices, config.bits), absmax=absmax, scale_absmax=empty,
                           scale_offset=offset, shape=tuple(weight.shape), config=config)


def dequantized_scales(q: QuantizedTensor) -> torch.Tensor:
    """The per-block absmax scales as used by `dequantize` (after undoing double quantization)."""
    if q.config.scale_bits == 0:
        return q.absmax
    code = dynamic_code_8bit().to(q.absmax.device)
    return blockwise_dequantize(q.absmax.long(), q.scale_absmax, q.config.scale_block_size, code) + q.scale_offset


def code_indices(q: QuantizedTensor) -> torch.Tensor:
    """The b0-bit codebook index of every weight, flat."""
    return unpack_codes(q.codes, q.config.bits, q.numel)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The float32 matrix that `q` stands for (the frozen base weight the forward pass uses)."""
    code = normal_float_code(q.config.bits).to(q.codes.device)
    flat = blockwise_dequantize(code_indices(q), dequantized_scales(q), q.config.block_size, code)
    return flat.reshape(q.shape)


def fake_quantize(weight: torch.Tensor, config: BlockQuantConfig = NF4) -> torch.Tensor:
    """dequantize(quantize(weight)): the quantizer as a map on matrices (what LQ-LoRA alternates with)."""
    return dequantize(quantize(weight, config)).to(weight.dtype)
