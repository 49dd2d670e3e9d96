"""Transformed LoRA (Tao et al. 2025): a full-rank transform of the pretrained weight plus a low-rank residual.

  W = T W0 + s B A,   T = T_1 ⊗ T_2 (d_out x d_out, d_out = m_1 m_2),   s = alpha / r,

T is dense and full rank (while T_1, T_2 are) yet costs m_1² + m_2² values: a d_out-vector v read as an
m_1 x m_2 matrix V (row-major) maps to T v = vec(T_1 V T_2ᵀ). It starts at the identity and moves W0
toward the target so the residual B A (LoRA's, B = 0 at start) can stay low-rank. With T diagonal it is
a per-output-row rescaling of W0, DoRA's magnitude (rank-1 structured here: diag(t_1 ⊗ t_2)).

The forward never builds T: it applies T_2 along the last axis and T_1 along the other one of the base
output (bias removed: T acts on W0 only, the bias stays), two `nn.Linear`s on reshaped activations, so
Opacus' own Linear sampler (which sums over every non-batch axis) gives exact per-sample gradients in
hooks mode; the card's functorch fallback is not needed. ΔW = (T - I) W0 + s B A depends on W0, so the
merged update is remembered for unmerge (as for DoRA and Bat). T is bilinear in (T_1, T_2) and B A in
(B, A): averaging is not exact. FedSVD re-factors B A alone (its product is unchanged), FFA-LoRA freezes A.

Decisions (the card marks them "unsure"): T multiplies W0 from the left (the output side, the card's
T·W0, so a diagonal T is DoRA's row magnitude); T is a Kronecker product, i.e. a tensor-train matrix with
two cores and TT-rank 1 (the paper uses tensor-ring / TT cores of higher rank; rank 1 keeps each core a
plain linear map); m_1 is the largest divisor of d_out up to √d_out (384 = 16 x 24: 832 values). The
residual is LoRA's B A, as the issue asks, not a second tensor network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, RemembersMergedDelta, ScaledByAlphaOverRank
from common.adapters.lora import seed_for, seeded_lora_pair


@dataclass(frozen=True)
class TransformedLoRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


def kronecker_shape(d: int) -> tuple[int, int]:
    """(m_1, m_2) with m_1 m_2 = d and m_1 the largest divisor of d up to √d."""
    m1 = next(m for m in range(math.isqrt(d), 0, -1) if d % m == 0)
    return m1, d // m1


def identity_linear(m: int, like: nn.Linear) -> nn.Linear:
    layer = nn.Linear(m, m, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(m))
    return layer.to(device=like.weight.device, dtype=like.weight.dtype)


class TransformedLoRALinear(RemembersMergedDelta, AdapterLayer):
    def __init__(self, base: nn.Linear, config: TransformedLoRAConfig, name: str):
        super().__init__(base)
        self.scaling = config.scaling
        self.kron_shape = kronecker_shape(base.out_features)
        self.tlora_T1, self.tlora_T2 = (identity_linear(m, base) for m in self.kron_shape)
        self.lora_A, self.lora_B = seeded_lora_pair(base, config.rank, seed_for(config.seed, name))
        self._merged_delta: torch.Tensor | None = None

    def transform(self) -> torch.Tensor:
        """T = T_1 ⊗ T_2 (d_out x d_out)."""
        return torch.kron(self.tlora_T1.weight, self.tlora_T2.weight)

    def apply_transform(self, v: torch.Tensor) -> torch.Tensor:
        """T v along the last axis: vec(T_1 V T_2ᵀ) with V the m_1 x m_2 row-major view of v."""
        v = self.tlora_T2(v.unflatten(-1, self.kron_shape))
        return self.tlora_T1(v.transpose(-1, -2)).transpose(-1, -2).flatten(-2)

    def delta_weight(self) -> torch.Tensor:
        if self._merged_delta is not None:
            return self._merged_delta
        w0 = self.base.weight
        return self.transform() @ w0 - w0 + self.scaling * self.lora_B.weight @ self.lora_A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + self.branch_from(x, out)

    def branch_from(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(T - I) W0 x + s B A x, reading W0 x off the base output."""
        w0x = out if self.base.bias is None else out - self.base.bias
        return self.apply_transform(w0x) - w0x + self.scaling * self.lora_B(self.lora_A(x))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_from(x, self.base(x))


def transformed_lora_trainable_count(d_out: int, d_in: int, config: TransformedLoRAConfig) -> int:
    """m_1² + m_2² for T plus LoRA's r (d_in + d_out)."""
    m1, m2 = kronecker_shape(d_out)
    return m1 * m1 + m2 * m2 + config.rank * (d_in + d_out)
