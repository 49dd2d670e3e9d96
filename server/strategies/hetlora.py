"""HetLoRA (Cho et al. 2024): zero-pad each client's LoRA to r_max, sparsity-weighted mean, truncate back.

Client k trains rank r_k <= r_max and receives the first r_k components of the global (B, A). The server
zero-pads every reply to r_max and averages the padded factors with weights p_k ‖B_k A_k‖_F (normalized;
`server.rank_merging.hetlora_merge`): a client whose update is larger counts more, as in the paper. Like
FedAvg on LoRA this averages B and A separately, so mean(B) mean(A) is not the mean of the products.

Rank self-pruning (`hetlora-prune = γ > 0`): when the last component of a client's reply carries less than
γ of its update's norm (‖b_r a_rᵀ‖_F / ‖B A‖_F, summed over layers), that client trains one rank fewer
from the next round on. The paper's client makes this decision on its own adapter; here the server makes
it from the same reply, which is post-processing of a DP output and costs no privacy.

Secure aggregation: not compatible as is (the norm weights read each client's payload; with example
weights only, the padded mean would be a plain weighted sum).
"""

from __future__ import annotations

import numpy as np

from common.logs import get_logger
from server.rank_merging import hetlora_merge, product_norm
from server.aggregation import lora_layer_keys
from server.strategies.rank_hetero import RankHeteroStrategy

log = get_logger("server")


class HetLoRA(RankHeteroStrategy):
    def merge_layer(self, bs, as_, weights, b_global, a_global, server_round):
        return hetlora_merge(bs, as_, weights, self.r_max)

    def after_merge(self, payloads: list[dict[str, np.ndarray]], nodes: list[int]) -> None:
        if self.prune <= 0:
            return
        for payload, node in zip(payloads, nodes, strict=True):
            share = last_component_share(payload)
            rank = self.rank_of(node)
            if rank > 1 and share < self.prune:
                self.node_ranks[node] = rank - 1
                log.info("hetlora: node %s prunes its rank %d -> %d (last component: %.3f of its update norm)",
                         node, rank, rank - 1, share)


def last_component_share(payload: dict[str, np.ndarray]) -> float:
    """Σ_layers ‖b_r a_rᵀ‖_F / Σ_layers ‖B A‖_F for the last rank component r of a reply."""
    last = total = 0.0
    for a_key, b_key in lora_layer_keys(payload):
        a, b = payload[a_key], payload[b_key]
        last += float(np.linalg.norm(b[:, -1]) * np.linalg.norm(a[-1]))
        total += product_norm(b, a)
    return last / total if total > 0 else 0.0
