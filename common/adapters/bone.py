"""Bone (arXiv 2409.15371, "Block-Affine"): one shared r-wide block update tiled across W0's column blocks.

PEFT 0.21 has no `BoneConfig` any more: Bone was renamed MiSS (`peft.tuners.miss`), and its default
variant (`init_weights=True`, "balance") is Bone's. We follow that code exactly, so the PEFT export
(`MissConfig`) gives our logits. With a trainable b (r x d_out), zero at start:

  ΔW[:, j r:(j+1) r] = bᵀ for every column block j (the last, partial block gets the first columns of bᵀ),
  ΔW x = (Σ_j x_j) b with x_j the j-th r-chunk of x (x zero-padded to a multiple of r, as in PEFT).

No α/r scaling (PEFT has none). rank(ΔW) <= r; r d_out values train per layer (LoRA's B alone).
ΔW is linear in b with W0 playing no part, so averaging the clients' b is exactly averaging their ΔW.
The factor is named `miss_block` and kept in PEFT's layout (r x d_out) so the export maps it by name;
it is not an `nn.Linear` (whose weight would be d_out x r) and so has its own Opacus grad sampler.

PEFT's "bat" variant (ΔW_ij = (W0_ij + I) b_i, the "weight guide") is adapter `bat` (`bat.py`);
its "mini" variant (b repeated along d_out) is not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.adapters.base import AdapterLayer


@dataclass(frozen=True)
class BoneConfig:
    rank: int = 8
    target_modules: tuple[str, ...] = ("query", "value")


class RightMultiply(nn.Module):
    """y = x @ weight, weight (in x out): an `nn.Linear` without bias, stored transposed as PEFT does."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


@register_grad_sampler(RightMultiply)
def right_multiply_grad_sample(layer: RightMultiply, activations: list[torch.Tensor], backprops: torch.Tensor
                               ) -> dict[nn.Parameter, torch.Tensor]:
    """d loss_n / d weight = Σ over the example's positions of x_tᵀ g_t (in x out)."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    return {layer.weight: torch.einsum("n...i,n...o->nio", x, backprops)}


def chunk_sum(x: torch.Tensor, width: int) -> torch.Tensor:
    """Σ_j x_j over the `width`-wide chunks of the last axis, zero-padding it to a multiple of `width`."""
    pad = (-x.shape[-1]) % width
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // width, width).sum(dim=-2)


def tile_columns(block: torch.Tensor, d_in: int) -> torch.Tensor:
    """[block block ... block] (rows x d_in): `block` (rows x w) repeated along columns, cut at d_in.

    The dense matrix M with M x = block (Σ_j x_j), the chunk sum of `chunk_sum(x, w)`.
    """
    return block.repeat(1, math.ceil(d_in / block.shape[1]))[:, :d_in]


class BoneLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: BoneConfig, name: str):
        super().__init__(base)
        self.rank = config.rank
        self.miss_block = RightMultiply(config.rank, base.out_features)
        self.miss_block.to(device=base.weight.device, dtype=base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return tile_columns(self.miss_block.weight.T, self.base.in_features)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.miss_block(chunk_sum(x, self.rank))


def bone_trainable_count(d_out: int, d_in: int, config: BoneConfig) -> int:
    """r d_out: one r x d_out block, whatever d_in."""
    return config.rank * d_out


def bone_peft_config(config, heads: list[str]):
    """PEFT 0.21's MiSS in its default ("balance") variant, which is Bone."""
    from peft import MissConfig

    return MissConfig(r=config.rank, miss_dropout=0.0, init_weights=True,
                      target_modules=list(config.target_module_names), modules_to_save=heads, bias="none")
