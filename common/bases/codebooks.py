"""Codebooks (sorted value tables in [-1, 1]) for blockwise absmax quantization.

NormalFloat-k (Dettmers et al. 2023, QLoRA, Sec. 3 "4-bit NormalFloat"): the 2^k values are quantiles of
N(0, 1), asymmetric so that 0 is represented exactly (2^(k-1) positive values, 2^(k-1) - 1 negative ones,
and 0), normalised to [-1, 1]. The quantile probabilities run from 0.5 to `offset`, where QLoRA (and
bitsandbytes' `create_normal_map`) uses offset = 1 - (1/(2(2^k - 1)) + 1/2^(k+1)) / 2 = 0.9677083 for
k = 4. LQ-LoRA (Guo et al. 2024, Sec. 3.1) uses the same NF construction for its other bit widths; for
k != 4 we apply the same offset formula (decision: the paper does not print the tables).

The 8-bit "dynamic" code (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning") is what
bitsandbytes uses for double quantization of the absmax scales; it is rebuilt here from the same formula
so our double-quantized NF4 equals bitsandbytes' bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from scipy.stats import norm

# The 16 NF4 values as printed in QLoRA's Appendix E and shipped by bitsandbytes (float32).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf_offset(bits: int) -> float:
    """The largest quantile probability of NF-`bits`: the mean of the outermost half-bin widths."""
    return 1.0 - 0.5 * (1.0 / (2 * (2**bits - 1)) + 1.0 / 2 ** (bits + 1))


@lru_cache(maxsize=None)
def normal_float_quantiles(bits: int) -> tuple[float, ...]:
    """NF-`bits` from the quantile rule (for bits = 4 it reproduces NF4_CODE to float32 rounding)."""
    half = 2 ** (bits - 1)
    offset = nf_offset(bits)
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1].numpy())
    values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    return tuple((values / values.abs().max()).float().tolist())


def normal_float_code(bits: int) -> torch.Tensor:
    """The sorted NF-`bits` codebook (2^bits float32 values, min -1, max 1, containing 0).

    For bits = 4 this is the published NF4 table exactly; other widths come from the same quantile rule.
    """
    if not 1 < bits <= 8:
        raise ValueError(f"NormalFloat needs 2..8 bits, got bits = {bits}")
    return torch.tensor(NF4_CODE if bits == 4 else normal_float_quantiles(bits), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic(max_exponent_bits: int = 7, total_bits: int = 8) -> tuple[float, ...]:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return tuple(sorted(data))


def dynamic_code_8bit() -> torch.Tensor:
    """The signed 8-bit dynamic-exponent codebook (256 sorted values in [-1, 1]) used for the scales."""
    return torch.tensor(_dynamic(), dtype=torch.float32)


def max_half_gap(code: torch.Tensor) -> float:
    """Half the largest gap between adjacent code values: the worst rounding error on [-1, 1]."""
    return float((code[1:] - code[:-1]).max() / 2)
