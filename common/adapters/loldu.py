"""LoLDU: freeze the LU factors of W0 and train a diagonal between them.

Pivoted LU (float64, CPU): W0 = P L U' with L unit-lower (d_out x m), U' upper (m x d_in). With
D = diag(U') and U = D⁻¹ U' (unit-upper), W0's leading rank-r part is P L_r diag(D_r) U_r. LoLDU
trains z (from D_r) and a scalar s; ΔW depends only on v = s z, so we train δ = v - v0 directly
(the card's recommendation: averaging v is exact, averaging s and z separately is not), which makes
W = W0 + (P L_r) diag(δ) U_r: r values per layer instead of r + 1, the same set of reachable weights.
Tiny pivots are clamped before dividing (see `lu_bases`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.adapters.decompositions import lu_bases
from common.adapters.diagonal_basis import DiagonalBasisLinear


@dataclass(frozen=True)
class LoLDUConfig:
    rank: int = 8
    target_modules: tuple[str, ...] = ("query", "value")


def loldu_linear(base: nn.Linear, config: LoLDUConfig, name: str) -> DiagonalBasisLinear:
    left, right, _ = lu_bases(base.weight, config.rank)
    return DiagonalBasisLinear(base, left=left, right=right)
