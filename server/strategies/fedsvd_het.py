"""Rank-heterogeneous FedSVD: clients train B against the first r_k rows of the global orthonormal A.

Client k receives A_g[:r_k] (frozen) and B_g[:, :r_k] and sends back B_k. The slots beyond r_k it never
held are unchanged from its point of view, so its update is [B_k, B_g[:, r_k:]] against A_g; the server
averages those (example-weighted) and re-orthogonalizes the product to rank r_max with QR + a small SVD
(`server.rank_merging.hetero_fedsvd_merge`): B' A' = Σ p_k (B_k A_g[:r_k] + B_g[:, r_k:] A_g[r_k:]),
exactly, with A' orthonormal rows ordered by singular value, so every client's prefix is the best part.

Secure aggregation: compatible. The average is a weighted sum of the padded B_k (a client fills the slots
it does not hold with the global's columns, which every party knows); the SVD runs on the unmasked sum.
"""

from __future__ import annotations

from server.rank_merging import hetero_fedsvd_merge
from server.strategies.rank_hetero import RankHeteroStrategy


class FedSVDHet(RankHeteroStrategy):
    frozen_factors = ("lora_A",)
    reorders_ranks = True
    secure_aggregation = True

    def merge_layer(self, bs, as_, weights, b_global, a_global, server_round):
        return hetero_fedsvd_merge(bs, b_global, a_global, weights, self.r_max, seed=self.seed + server_round)
