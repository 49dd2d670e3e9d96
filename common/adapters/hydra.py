"""Hydra (Kim et al. 2023): a parallel LoRA branch plus a sequential one on the base layer's output.

  h = W0 x + b0 + s B_p A_p x + s B_s A_s (W0 x + b0),   s = alpha / r,

with A_p (r x d_in), B_p (d_out x r), A_s (r x d_out), B_s (d_out x r): the parallel branch learns
new features, the sequential one linearly recombines the pretrained ones. Merged:
W' = W0 + s (B_p A_p + B_s A_s W0), b' = b0 + s B_s A_s b0. With B_s = 0 it is LoRA.
All four factors are `nn.Linear`s (A_s reads the frozen layer's output), so Opacus' own samplers apply.
r (d_in + 3 d_out) values train per layer. ΔW is bilinear in each branch's (A, B): averaging is not exact.

Decisions (the card marks them "unsure"), from the authors' code (github.com/extremebird/Hydra,
`vtab1k/hydra.py`): the sequential branch sees the base output *with* its bias (W0 x + b0), so merging
changes the bias too; A random, B = 0 in both branches, so training starts at W0. Ours differ from
that code in: no biases in the branches (ΔW is the whole update apart from the b0 term), LoRA's seeded
Kaiming-uniform A (theirs: Xavier) and LoRA's alpha / r (theirs: a free `scale`).

Strategies: only FedAvg of all four factors. FFA-LoRA (freeze both A, train both B) would make ΔW
linear in (B_p, B_s) and FedSVD could re-factor each branch's mean product, but both strategies handle
the one `lora_A`/`lora_B` pair only, so they refuse Hydra rather than mishandle its second branch.

W0 enters ΔW, so while merged (`base.weight` = W0 + ΔW) the merged update is remembered, as DoRA does,
and unmerge subtracts exactly what merge added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank
from common.adapters.lora import seed_for


@dataclass(frozen=True)
class HydraConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


class HydraLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: HydraConfig, name: str):
        super().__init__(base)
        d_in, d_out, r = base.in_features, base.out_features, config.rank
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.hydra_par_A = nn.Linear(d_in, r, bias=False)
        self.hydra_par_B = nn.Linear(r, d_out, bias=False)
        self.hydra_seq_A = nn.Linear(d_out, r, bias=False)
        self.hydra_seq_B = nn.Linear(r, d_out, bias=False)
        generator = torch.Generator().manual_seed(seed_for(config.seed, name))
        with torch.no_grad():
            for a in (self.hydra_par_A, self.hydra_seq_A):
                bound = 1.0 / math.sqrt(a.in_features)
                a.weight.copy_(torch.empty(a.weight.shape).uniform_(-bound, bound, generator=generator))
            self.hydra_par_B.weight.zero_()
            self.hydra_seq_B.weight.zero_()
        for factor in (self.hydra_par_A, self.hydra_par_B, self.hydra_seq_A, self.hydra_seq_B):
            factor.to(device=base.weight.device, dtype=base.weight.dtype)
        self._merged: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (ΔW, Δb) while merged

    def sequential_matrix(self) -> torch.Tensor:
        """s B_s A_s (d_out x d_out), applied to the base output."""
        return self.scaling * self.hydra_seq_B.weight @ self.hydra_seq_A.weight

    def delta_weight(self) -> torch.Tensor:
        if self._merged is not None:
            return self._merged[0]
        parallel = self.scaling * self.hydra_par_B.weight @ self.hydra_par_A.weight
        return parallel + self.sequential_matrix() @ self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        parallel = self.hydra_par_B(self.hydra_par_A(self.dropout(x)))
        sequential = self.hydra_seq_B(self.hydra_seq_A(self.dropout(out)))
        return out + self.scaling * (parallel + sequential)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) - self.base(x)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            delta = self.delta_weight().detach().clone()
            bias = None if self.base.bias is None else self.sequential_matrix() @ self.base.bias
            self.base.weight += delta.to(self.base.weight.dtype)
            if bias is not None:
                self.base.bias += bias.to(self.base.bias.dtype)
            self._merged = (delta, bias)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            delta, bias = self._merged
            self.base.weight -= delta.to(self.base.weight.dtype)
            if bias is not None:
                self.base.bias -= bias.to(self.base.bias.dtype)
            self._merged = None
            self.merged = False


def hydra_trainable_count(d_out: int, d_in: int, config: HydraConfig) -> int:
    """r (d_in + d_out) for the parallel branch plus r (d_out + d_out) for the sequential one."""
    return config.rank * (d_in + 3 * d_out)
