"""Which LoRA rank a client trains, for rank-heterogeneous federations (a phone at 4, a hospital at 64).

A client's rank is its SuperNode's node-config `rank` if set (what a deployed device declares), else
its entry of the run config's `client-ranks` (by partition id, cycled), else the run's `rank`. The run's
`rank` is r_max, the rank of the global adapter.

Every client scales its update by alpha / r_max, not alpha / r_k: with one common scale, a rank-r_k
adapter zero-padded to r_max has exactly the same ΔW, which is what lets the server merge adapters of
different ranks factor by factor (`server/rank_merging.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from common.config import RunConfig
from common.errors import ConfigError


def client_rank(config: RunConfig, node_config: Mapping, partition_id: int) -> int:
    """This client's rank: node-config `rank`, else `client-ranks[partition_id]` (cycled), else `rank`."""
    if "rank" in node_config:
        value = node_config["rank"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"node-config rank = {value!r} is invalid: give an integer >= 1, e.g. rank=4")
        return int(value)
    ranks = config.client_rank_list
    return ranks[partition_id % len(ranks)] if ranks else config.rank


def config_for_rank(config: RunConfig, rank: int) -> RunConfig:
    """The run config a rank-`rank` client builds its model from: same scale alpha / r_max as everyone.

    Under DyLoRA (`rank-schedule = "dylora"`) the client keeps the run's alpha instead: every step of its
    schedule trains a prefix b <= r_k at DyLoRA's scale alpha / b, the scale that prefix has in the global
    r_max adapter (the nested family), so the common alpha / r_max is never what it trains at."""
    if rank == config.rank:
        return config
    alpha = config.alpha if config.rank_schedule == "dylora" else config.alpha * rank / config.rank
    return dataclasses.replace(config, rank=rank, alpha=alpha, client_ranks="")


def stored_rank(arrays: Mapping, default: int) -> int:
    """The LoRA rank of saved global arrays (FLoRA's stacked global is not r_max), or `default`."""
    ranks = {value.shape[0] for key, value in arrays.items() if key.endswith(".lora_A.weight")}
    return ranks.pop() if len(ranks) == 1 else default
