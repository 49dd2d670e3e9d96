"""LaMDA (Azizi et al. 2024), federated form: frozen spectral projections around a trainable r x r core.

ΔW = s · U_r S V_rᵀ with PMA = V_rᵀ and PMB = U_r, the top-r singular vectors of W0 (float64 CPU SVD,
canonical signs, so every party rebuilds them and only S travels). Both projections are orthonormal,
so a step on S moves ΔW by the same Frobenius amount (unlike LoRA-XS, whose B carries Σ_r).
Decisions: the paper trains PMB for the first iterations and freezes it gradually; in a federation that
phase would make ΔW bilinear and averaging inexact, so PMB is frozen from round 0 (METHODS.md card 43).
S starts at 0 (W = W0): a residual init W0 - U_r Σ_r V_rᵀ with S = Σ_r is the same model and the same
DP-SGD gradients. LaMDA++'s per-layer rank allocation is not built (one `rank` for every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.adapters.base import ScaledByAlphaOverRank
from common.adapters.core_basis import CoreBasisLinear
from common.adapters.decompositions import truncated_svd


@dataclass(frozen=True)
class LaMDAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")


def lamda_linear(base: nn.Linear, config: LaMDAConfig, name: str) -> CoreBasisLinear:
    u, _, vh = truncated_svd(base.weight.detach(), config.rank)
    return CoreBasisLinear(base, left=u, right=vh, scaling=config.scaling)
