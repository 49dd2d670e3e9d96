"""SVD-free projection (card 29): columns of the orthonormal DCT-II basis, picked by the private gradient.

For the side of G (m x n) that a projector acts on (the left when m <= n, as GaLore's), the DCT-II matrix
Q (m x m), Q[i, k] = c_k cos(π (2i + 1) k / (2m)) with c_0 = √(1/m), c_k = √(2/m), is fixed: the same for
every party and step, so it needs no SVD and nothing to transfer. Each refresh scores column k by
‖Q[:, k]ᵀ G‖₂ and keeps the r best, P = Q[:, I]. The columns are orthonormal, so
‖Q_Iᵀ G‖_F² = Σ_{k ∈ I} ‖Q[:, k]ᵀ G‖², and the top-r scores are the r-subset that keeps the most of G.

Decisions (the card marks them "unsure"): the score is the L2 norm; I is kept in increasing order; the
moments of GaLore's Adam are kept when I changes (as they are when its SVD projector is refreshed). P is
stored as a matrix like the SVD projector (the card's "store only the r indices" saves memory we do not
need at adapter sizes). Under DP-SGD, G is the privatized gradient, so the choice of I is post-processing.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _dct_matrix(m: int) -> torch.Tensor:
    i = torch.arange(m, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(m, dtype=torch.float64).unsqueeze(0)
    scale = torch.full((1, m), math.sqrt(2.0 / m), dtype=torch.float64)
    scale[0, 0] = math.sqrt(1.0 / m)
    return scale * torch.cos(math.pi * (2 * i + 1) * k / (2 * m))


def dct_matrix(m: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Q (m x m), the orthonormal DCT-II basis as columns (float64, or `like`'s dtype and device)."""
    q = _dct_matrix(m)
    return q if like is None else q.to(device=like.device, dtype=like.dtype)


def dct_projector(grad: torch.Tensor, rank: int) -> tuple[torch.Tensor, str]:
    """(P, side) as `galore.galore_projector` returns them: P = the r DCT columns of the projected side
    that carry the most of `grad`, "left" (m <= n: P is m x r) or "right" (P is n x r)."""
    side = "left" if grad.shape[0] <= grad.shape[1] else "right"
    oriented = grad if side == "left" else grad.T
    oriented = oriented if oriented.dtype == torch.float64 else oriented.float()
    q = dct_matrix(oriented.shape[0], like=oriented)
    scores = torch.linalg.vector_norm(q.T @ oriented, dim=1)  # ‖Q[:, k]ᵀ G‖₂ for each k
    chosen = torch.topk(scores, rank).indices.sort().values
    return q[:, chosen].to(grad.dtype), side
