"""FLoRA (Wang et al. 2024): stack the clients' LoRAs: exact aggregation of any ranks, growing global rank.

Each round a client adds the received global ΔW = s B_g A_g to its frozen base weights and trains a fresh
LoRA of its own rank on top; the server stacks the replies onto the global:
B_g <- [B_g, p_1 B_1, …, p_K B_K], A_g <- [A_g; A_1; …; A_K], so B_g A_g gains exactly Σ p_k B_k A_k.
Download cost: the global rank grows by Σ r_k every round (after T rounds, T Σ r_k (d_in + d_out)
numbers per layer, sent to every client). `global-max-rank = R` caps it: above R the stack is replaced by
its best rank-R approximation (QR of both stacks + a small SVD), no longer exact.

Secure aggregation: not compatible (stacking keeps each client's factors apart; the server sees them).
"""

from __future__ import annotations

import numpy as np

from server.rank_merging import flora_stack
from server.strategies.rank_hetero import RankHeteroStrategy


class FLoRA(RankHeteroStrategy):
    fold_global = True

    def node_downlink(self, node: int, down: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return down  # every client adds the whole stack to its base

    def merge_layer(self, bs, as_, weights, b_global, a_global, server_round):
        if not np.any(b_global):  # the initial LoRA (B = 0) adds nothing: start the stack empty
            b_global, a_global = b_global[:, :0], a_global[:0]
        return flora_stack(b_global, a_global, bs, as_, weights, max_rank=self.global_max_rank,
                           seed=self.seed + server_round)
