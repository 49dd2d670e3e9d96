"""LoRA-LEGO: merge the clients' LoRAs rank-1 unit by rank-1 unit, by clustering the units into r_max.

Every column/row pair (b_j, a_j) of every client is a unit; units are canonicalized (balanced norms, a
fixed sign), clustered with k-means into r_max clusters, and each cluster becomes one rank-1 unit of the
global adapter, rescaled so the merged ΔW has the norm of the exact mean (`server.lego.lego_merge`).
Units are ordered by size, so client k receives the r_k largest. A heuristic: the Frobenius-optimal
rank-r_max merge is FlexLoRA's truncated SVD; LEGO keeps whole units, which suits merging adapters
trained on different tasks. `python -m server.merge` applies the same merge to finished runs' adapters.

Secure aggregation: not compatible (clustering needs each client's units).
"""

from __future__ import annotations

from server.lego import lego_merge
from server.strategies.rank_hetero import RankHeteroStrategy


class LoRALEGO(RankHeteroStrategy):
    reorders_ranks = True  # the merged B A is re-factored into new ranks

    def merge_layer(self, bs, as_, weights, b_global, a_global, server_round):
        return lego_merge(bs, as_, weights, self.r_max, seed=self.seed + server_round)
