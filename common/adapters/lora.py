"""Plain LoRA (Hu et al. 2021): W x + s * B A x with s = alpha / r, base weight frozen.

A and B are ordinary `nn.Linear` modules so that Opacus computes their per-sample gradients with its
built-in einsum grad sampler (hooks mode), and so that a strategy can freeze A by `requires_grad`.
A is initialised from a generator seeded by (seed, module name): every party that builds the model
with the same seed gets the same A, which is what lets FFA-LoRA send only a seed instead of A.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank


@dataclass(frozen=True)
class LoRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


class LoRALinear(AdapterLayer):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    # A 0/1 vector over the r ranks that a rank schedule (DyLoRA, `common/training/dylora.py`) sets for one
    # step; a plain attribute, not a buffer (Opacus), and None (every rank on) outside a schedule's steps
    rank_mask: torch.Tensor | None = None

    def __init__(self, base: nn.Linear, config: LoRAConfig, name: str):
        super().__init__(base)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False)
        self.lora_A.to(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B.to(device=base.weight.device, dtype=base.weight.dtype)
        self.reset_parameters(seed_for(config.seed, name))

    def reset_parameters(self, seed: int) -> None:
        """A ~ Kaiming-uniform (as in PEFT) from a named seed; B = 0 so training starts at W0."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.base.in_features)
        with torch.no_grad():
            a = torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the dense update this adapter adds to the base weight (d_out x d_in)."""
        return self.scaling * self.lora_B.weight @ self.lora_A.weight

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lora_A(self.dropout(x))
        if self.rank_mask is not None:  # B's per-sample gradients then see zeros on the masked ranks
            hidden = hidden * self.rank_mask
        return self.scaling * self.lora_B(hidden)


def seeded_lora_pair(base: nn.Linear, rank: int, seed: int) -> tuple[nn.Linear, nn.Linear]:
    """(A, B) as LoRA's own, on `base`'s device and dtype: A from the seed, B = 0 (FFA-LoRA rebuilds A)."""
    a = nn.Linear(base.in_features, rank, bias=False)
    b = nn.Linear(rank, base.out_features, bias=False)
    bound = 1.0 / math.sqrt(base.in_features)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a.weight.copy_(torch.empty(a.weight.shape).uniform_(-bound, bound, generator=generator))
        b.weight.zero_()
    return (a.to(device=base.weight.device, dtype=base.weight.dtype),
            b.to(device=base.weight.device, dtype=base.weight.dtype))


def seed_for(seed: int, name: str) -> int:
    """A per-module seed that does not depend on the order modules are visited in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def lora_trainable_count(d_out: int, d_in: int, config: LoRAConfig) -> int:
    """r (d_in + d_out): A is r x d_in, B is d_out x r."""
    return config.rank * (d_in + d_out)
