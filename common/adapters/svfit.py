"""SVFit: train only the top-r singular values of W0, its singular vectors frozen.

W = W0 + U_r diag(δ) V_rᵀ, where W0 = U Σ Vᵀ and δ = s - σ_r is the change of the top-r singular
values (the paper trains s starting at σ_r; δ starting at 0 is the same model and the same DP-SGD
gradients, and makes the payload a plain update). U_r and V_r come from a float64 CPU SVD with
canonical signs, so every party rebuilds them identically from the shared base model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.adapters.decompositions import truncated_svd
from common.adapters.diagonal_basis import DiagonalBasisLinear


@dataclass(frozen=True)
class SVFitConfig:
    rank: int = 8
    target_modules: tuple[str, ...] = ("query", "value")


def svfit_linear(base: nn.Linear, config: SVFitConfig, name: str) -> DiagonalBasisLinear:
    u, _, vh = truncated_svd(base.weight.detach(), config.rank)
    return DiagonalBasisLinear(base, left=u, right=vh)
