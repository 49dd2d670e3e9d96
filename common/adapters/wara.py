"""WaRA (Heidari et al. 2025): low-rank factors in the 2-D Haar wavelet domain of ΔW, one pair per sub-band.

One level of the orthonormal 2-D Haar transform splits a d_out x d_in matrix into four sub-bands
C_ab (a: the row band, b: the column band; L = pair sums / √2, H = pair differences / √2). WaRA trains
C_ab = B_ab A_ab (rank r each) and maps back with the inverse transform:

  ΔW = s IDWT2([[B_LL A_LL, B_LH A_LH], [B_HL A_HL, B_HH A_HH]]) = s Σ_ab (H_aᵀ B_ab)(A_ab H_b),

H_L, H_H the low and high halves of the orthonormal Haar matrix (an odd last element is passed to the
low band as is). s = alpha / r. The forward never builds ΔW: x -> Haar analysis (sums and differences
of pairs, no parameters) -> the four rank-r pairs (`nn.Linear`s) -> Haar synthesis.

What this adds over LoRA: the transform is orthonormal and linear, so a single pair on the packed
coefficients would give ΔW = (H_outᵀ B)(A H_in), rank <= r: LoRA in a fixed rotated basis, nothing new.
Per sub-band pairs give rank(ΔW) up to min(4r, d_in, d_out), each pair confined to one band of
input and output frequencies, for 2 r (d_in + d_out) values per layer (twice LoRA's at the same r; a
rank-2r LoRA costs the same and reaches only 2r). ΔW is bilinear in each (A, B): averaging is inexact.

Decisions (the card marks them "unsure"): one level, Haar, one independent pair per sub-band (the
issue asks for the variant beyond rank r). The paper's first version decomposes the weight update in
the wavelet domain, as here; its later version transforms patch tokens laid out as an image grid (a
mixing across tokens that no per-token linear update can express) with one adapter shared across the
sub-bands, which the orthonormality argument above would reduce to rank <= r. Each A_ab is LoRA's seeded
Kaiming-uniform (bound 1/sqrt of its band's width), each B_ab = 0, so training starts at W0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank
from common.adapters.lora import seed_for

BANDS = ("LL", "LH", "HL", "HH")  # (row band, column band) of the d_out x d_in coefficient matrix


@dataclass(frozen=True)
class WaRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


def band_sizes(n: int) -> tuple[int, int]:
    """(low, high) band widths of an n-vector: ceil(n / 2), floor(n / 2)."""
    return (n + 1) // 2, n // 2


def haar_analysis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) = ((x_2i + x_2i+1) / √2, (x_2i − x_2i+1) / √2) along the last axis; H x, split."""
    pairs = x.shape[-1] // 2
    even, odd = x[..., 0 : 2 * pairs : 2], x[..., 1 : 2 * pairs : 2]
    low, high = (even + odd) / math.sqrt(2), (even - odd) / math.sqrt(2)
    if x.shape[-1] % 2:
        low = torch.cat([low, x[..., -1:]], dim=-1)
    return low, high


def haar_synthesis(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The inverse of `haar_analysis` (Hᵀ [low; high]) along the last axis."""
    pairs = high.shape[-1]
    even, odd = (low[..., :pairs] + high) / math.sqrt(2), (low[..., :pairs] - high) / math.sqrt(2)
    out = torch.stack([even, odd], dim=-1).flatten(-2)
    return torch.cat([out, low[..., pairs:]], dim=-1) if low.shape[-1] > pairs else out


def inverse_haar_2d(coefficients: torch.Tensor, rows_low: int, cols_low: int) -> torch.Tensor:
    """IDWT2: H_outᵀ C H_in for C (d_out x d_in) whose first rows_low rows / cols_low columns are low bands."""
    by_cols = haar_synthesis(coefficients[:, :cols_low], coefficients[:, cols_low:])
    return haar_synthesis(by_cols.T[:, :rows_low], by_cols.T[:, rows_low:]).T


class WaRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: WaRAConfig, name: str):
        super().__init__(base)
        self.scaling = config.scaling
        self.rows = dict(zip("LH", band_sizes(base.out_features)))
        self.cols = dict(zip("LH", band_sizes(base.in_features)))
        generator = torch.Generator().manual_seed(seed_for(config.seed, name))
        for band in BANDS:
            a = nn.Linear(self.cols[band[1]], config.rank, bias=False)
            b = nn.Linear(config.rank, self.rows[band[0]], bias=False)
            bound = 1.0 / math.sqrt(max(a.in_features, 1))
            with torch.no_grad():
                a.weight.copy_(torch.empty(a.weight.shape).uniform_(-bound, bound, generator=generator))
                b.weight.zero_()
            setattr(self, f"wara_{band}_A", a.to(device=base.weight.device, dtype=base.weight.dtype))
            setattr(self, f"wara_{band}_B", b.to(device=base.weight.device, dtype=base.weight.dtype))

    def factor(self, band: str, side: str) -> nn.Linear:
        return getattr(self, f"wara_{band}_{side}")

    def coefficients(self) -> torch.Tensor:
        """The sub-band matrix [[B_LL A_LL, B_LH A_LH], [B_HL A_HL, B_HH A_HH]] (d_out x d_in), unscaled."""
        block = {band: self.factor(band, "B").weight @ self.factor(band, "A").weight for band in BANDS}
        return torch.cat([torch.cat([block["LL"], block["LH"]], dim=1),
                          torch.cat([block["HL"], block["HH"]], dim=1)], dim=0)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * inverse_haar_2d(self.coefficients(), self.rows["L"], self.cols["L"])

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        z = dict(zip("LH", haar_analysis(x)))
        out = {a: sum(self.factor(a + b, "B")(self.factor(a + b, "A")(z[b])) for b in "LH") for a in "LH"}
        return self.scaling * haar_synthesis(out["L"], out["H"])


def wara_trainable_count(d_out: int, d_in: int, config: WaRAConfig) -> int:
    """Σ over the four sub-bands of r (band width in + band height out) = 2 r (d_in + d_out)."""
    return 2 * config.rank * (d_in + d_out)
