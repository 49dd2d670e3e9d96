"""Block-LoRA (Zhou et al. 2025, "One Head Eight Arms"): LoRA whose down-projection blocks are all one matrix.

LoRA's A (r x d_in) is split column-wise into n blocks A_j (r x c, c = ceil(d_in / n)) and every block
is the same trainable A_0, so with x_j the c-wide chunks of x (zero-padded to a multiple of c):

  ΔW = s B [A_0 A_0 ... A_0] (cut at d_in),   ΔW x = s B A_0 (Σ_j x_j),   s = alpha / r.

The big matmul becomes a chunk sum plus an r x c one: d_out r + r c values train per layer instead of
LoRA's r (d_in + d_out). rank(ΔW) <= min(r, c). ΔW is bilinear in (A_0, B), so averaging the factors
is not exact (as for LoRA).

Decisions (the card marks the partitioned dimension "unsure"): the paper (arXiv 2501.16720) splits
LoRA's factors into sub-matrices and shares all down-projection ones, turning part of the matmul into
additions; only a split of A along d_in does that (ΔW x = B A_0 Σ_j x_j), so we split A column-wise as
the card does (checked against the paper's abstract and summaries, not its method section).
n is run config `block-lora-blocks` (default 4, ours, not the paper's); a d_in that n does not divide
is zero-padded, as Bone pads to r. A_0 is LoRA's seeded
Kaiming-uniform (bound 1/sqrt(d_in), so the tiled A has LoRA's scale) and B = 0, so training starts at W0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank
from common.adapters.bone import chunk_sum, tile_columns
from common.adapters.lora import seed_for


@dataclass(frozen=True)
class BlockLoRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    blocks: int = 4
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


def block_width(d_in: int, blocks: int) -> int:
    """c = ceil(d_in / n): the width of one input chunk (and of the shared A_0)."""
    return math.ceil(d_in / blocks)


class BlockLoRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: BlockLoRAConfig, name: str):
        super().__init__(base)
        self.scaling = config.scaling
        self.width = block_width(base.in_features, config.blocks)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.block_A = nn.Linear(self.width, config.rank, bias=False)
        self.block_B = nn.Linear(config.rank, base.out_features, bias=False)
        generator = torch.Generator().manual_seed(seed_for(config.seed, name))
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.block_A.weight.copy_(torch.empty(self.block_A.weight.shape).uniform_(-bound, bound,
                                                                                       generator=generator))
            self.block_B.weight.zero_()
        self.block_A.to(device=base.weight.device, dtype=base.weight.dtype)
        self.block_B.to(device=base.weight.device, dtype=base.weight.dtype)

    def tiled_A(self) -> torch.Tensor:
        """[A_0 ... A_0] cut at d_in: the LoRA A this adapter equals (r x d_in)."""
        return tile_columns(self.block_A.weight, self.base.in_features)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.block_B.weight @ self.tiled_A()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.block_B(self.block_A(chunk_sum(self.dropout(x), self.width)))


def block_lora_trainable_count(d_out: int, d_in: int, config: BlockLoRAConfig) -> int:
    """d_out r (B) + r ceil(d_in / n) (the shared A_0)."""
    return config.rank * (d_out + block_width(d_in, config.blocks))
