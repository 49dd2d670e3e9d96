"""FlexLoRA (Bai et al. 2024): average the clients' products B_k A_k, give each the best rank-r_k part.

The server never forms a d_out × d_in matrix: Σ p_k B_k A_k = [p_1 B_1 … p_K B_K][A_1; …; A_K], and the
truncated SVD of that product comes from thin QRs of the two stacks and an SVD of the small R × R core,
R = Σ r_k (a randomized range finder above `RANDOMIZED_ABOVE`; see `server.rank_merging.svd_of_product`).
The global adapter keeps the top r_max components as B = U Σ, A = Vᵀ (orthonormal rows, which bounds
the clients' per-sample gradients of B); client k gets the first r_k of them, the best rank-r_k
approximation of the average. The paper keeps the full-rank average on the server; we keep rank r_max.

Secure aggregation: not compatible (the server needs each client's factors, not only their sum).
"""

from __future__ import annotations

from server.rank_merging import flexlora_merge
from server.strategies.rank_hetero import RankHeteroStrategy


class FlexLoRA(RankHeteroStrategy):
    reorders_ranks = True  # the merged B A is re-factored into new ranks

    def merge_layer(self, bs, as_, weights, b_global, a_global, server_round):
        return flexlora_merge(bs, as_, weights, self.r_max, seed=self.seed + server_round)
