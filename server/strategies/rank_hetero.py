"""What the rank-heterogeneous strategies share: each node's rank, per-node downlinks, rank-aware checks.

Clients train LoRA at ranks r_k <= r_max (the run's `rank`); see `common/ranks.py` for how a client's
rank is chosen and why every client scales by alpha / r_max. Before a node's first round the server asks
it for its rank (a Flower `query` message, answered by `client/client_app.py` without touching data),
then sends it the global adapter truncated to its rank: the first r_k components, which each strategy
keeps ordered so that this prefix is the part worth most. The subclasses differ only in `merge_layer`.

Privacy: every strategy here reads the clients' replies and nothing else (no data, no gradients): its
merge is post-processing of DP outputs and costs no privacy. The rank a node declares is not private.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.logs import get_logger
from server.aggregation import lora_layer_keys, mean_of_non_lora
from server.strategies.base import LoRAStrategy, factor_of, fault_options

log = get_logger("server")
QUERY_TIMEOUT_SECONDS = 300.0


class RankHeteroStrategy(LoRAStrategy):
    required_factors = ("lora_A", "lora_B")
    rank_heterogeneous = True
    adapters = ("lora",)  # the rank is LoRA's inner dimension; other adapters have no such slot structure
    secure_aggregation = False  # is the merge a weighted sum of (padded) payloads? (README table)

    def __init__(self, *, r_max: int, global_max_rank: int = 0, prune: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.r_max = r_max
        self.global_max_rank = global_max_rank
        self.prune = prune
        self.node_ranks: dict[int, int] = {}  # node id -> the rank it declared (lowered by HetLoRA's pruning)

    @classmethod
    def from_config(cls, config: RunConfig, run_dir: str) -> "RankHeteroStrategy":
        return cls(clients_per_round=config.clients_per_round, seed=config.seed, run_dir=run_dir,
                   adapter=config.adapter, r_max=config.rank, global_max_rank=config.global_max_rank,
                   prune=config.hetlora_prune, **fault_options(config))

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Also each node's rank (declared, or lowered by HetLoRA's pruning): a resumed run keeps them.

        They are keyed by node id: a restarted SuperLink whose nodes get new ids asks them again (and
        HetLoRA's pruning starts over); FLoRA's stack is in the global arrays themselves."""
        state, arrays = super().state_dict()
        return {**state, "node_ranks": {str(node): rank for node, rank in self.node_ranks.items()}}, arrays

    def load_state_dict(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_dict(state, arrays)
        self.node_ranks = {int(node): int(rank) for node, rank in state["node_ranks"].items()}

    # ---- the one thing each strategy defines ---------------------------------------------------
    def merge_layer(self, bs: list[np.ndarray], as_: list[np.ndarray], weights: list[float],
                    b_global: np.ndarray, a_global: np.ndarray, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's new global (B, A) from the clients' factors (A_k = the sent prefix if A was frozen)."""
        raise NotImplementedError

    # ---- ranks ---------------------------------------------------------------------------------
    def prepare_round(self, grid: Grid, nodes: list[int]) -> None:
        unknown = [node for node in nodes if node not in self.node_ranks]
        if unknown:
            self.query_ranks(grid, unknown)

    def query_ranks(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes for their rank once; a node that does not answer is treated as rank r_max."""
        messages = [Message(content=RecordDict({}), message_type=MessageType.QUERY, dst_node_id=node)
                    for node in nodes]
        for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT_SECONDS):
            node = reply.metadata.src_node_id
            rank = None if reply.has_error() else reply.content.config_records.get("adapter", {}).get("rank")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                log.warning("node %s did not declare a rank (%s); assuming r_max = %d", node,
                            reply.error.reason if reply.has_error() else f"rank = {rank!r}", self.r_max)
                continue
            client = reply.content.config_records.get("privacy", {}).get("client-id", node)
            if rank > self.r_max:
                log.warning("client %s declares rank %d > r_max = %d: its replies will be rejected; lower its "
                            "node-config rank or raise the run's rank", client, rank, self.r_max)
            self.node_ranks[node] = rank
        log.info("client ranks (node id: rank): %s", {n: self.node_ranks.get(n, self.r_max) for n in nodes})

    def rank_of(self, node: int) -> int:
        return self.node_ranks.get(node, self.r_max)

    def node_downlink(self, node: int, down: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global adapter truncated to the node's rank (its first r_k components)."""
        rank = min(self.rank_of(node), self.r_max)
        out = {}
        for key, value in down.items():
            factor = factor_of(key)
            out[key] = (value[:rank] if factor == "lora_A" else value[:, :rank] if factor == "lora_B" else value)
        return out

    def node_config(self, node: int) -> dict:
        return {"rank": self.rank_of(node)}

    def _check_shapes(self, payload: dict[str, np.ndarray], content: RecordDict, node: int) -> str:
        """LoRA factors of one rank r_k <= r_max (the node's declared rank) and the layer's d_in / d_out."""
        ranks = set()
        for key, value in payload.items():
            reference, factor = self.global_arrays[key], factor_of(key)
            if value.dtype != reference.dtype or value.ndim != reference.ndim:
                return f"{key} is {value.dtype}{list(value.shape)}, expected {reference.dtype} of {reference.ndim} dims"
            if factor == "lora_A":
                ranks.add(value.shape[0])
                fits = value.shape[1] == reference.shape[1]
            elif factor == "lora_B":
                ranks.add(value.shape[1])
                fits = value.shape[0] == reference.shape[0]
            else:
                fits = value.shape == reference.shape
            if not fits:
                return f"{key} has shape {list(value.shape)}, which does not fit the layer ({list(reference.shape)})"
        if len(ranks) > 1:
            return f"its factors have different ranks {sorted(ranks)}"
        rank = ranks.pop() if ranks else 0
        if rank < 1 and any(factor_of(k) in ("lora_A", "lora_B") for k in payload):
            return "its LoRA factors have rank 0"
        if rank > self.r_max:
            return f"its rank {rank} exceeds r_max = {self.r_max}"
        if node in self.node_ranks and rank != self.node_ranks[node]:
            return f"its rank is {rank} but it declared {self.node_ranks[node]}"
        return ""

    # ---- aggregation ---------------------------------------------------------------------------
    def aggregate_payloads(self, payloads: list[dict[str, np.ndarray]], weights: list[float], nodes: list[int],
                           server_round: int) -> dict[str, np.ndarray]:
        """Heads: example-weighted mean. LoRA layers: the strategy's `merge_layer`."""
        new_global = {**self.global_arrays, **mean_of_non_lora(payloads, weights)}
        for a_key, b_key in lora_layer_keys(self.global_arrays):
            a_global, b_global = self.global_arrays[a_key], self.global_arrays[b_key]
            bs = [p[b_key] for p in payloads]
            as_ = [p[a_key] if a_key in p else a_global[: p[b_key].shape[1]] for p in payloads]
            new_global[b_key], new_global[a_key] = self.merge_layer(bs, as_, weights, b_global, a_global,
                                                                    server_round)
        self.after_merge(payloads, nodes)
        return new_global

    def after_merge(self, payloads: list[dict[str, np.ndarray]], nodes: list[int]) -> None:
        """Per-node bookkeeping from the accepted replies (HetLoRA's rank pruning)."""
