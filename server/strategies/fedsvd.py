"""FedSVD: clients train only B (A frozen for the round); the server averages B, then re-orthogonalizes.

After averaging, B A is refactored as B' A' with A' = top-r right singular vectors of B A and
B' = U_r Σ_r, so the product is unchanged while A' has orthonormal rows (which bounds per-sample
gradient norms of B in the next round: ||A' x|| <= ||x||). The new A' is sent out next round.
The SVD is post-processing of DP outputs and costs no privacy. See `fedsvd_reorthogonalize`.
"""

from __future__ import annotations

import numpy as np

from server.aggregation import fedsvd_reorthogonalize
from server.strategies.base import LoRAStrategy


class FedSVD(LoRAStrategy):
    frozen_factors = ("lora_A",)
    required_factors = ("lora_A", "lora_B")
    reorders_ranks = True  # B A = U Σ Vᵀ: new ranks, ordered by singular value

    def after_averaging(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(arrays)
        for key in arrays:
            if ".lora_A." in key:
                b_key = key.replace(".lora_A.", ".lora_B.")
                out[b_key], out[key] = fedsvd_reorthogonalize(arrays[b_key], arrays[key])
        return out
