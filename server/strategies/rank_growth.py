"""Rank growth (IncreLoRA, TriAdaptLoRA) as a wrapper around a strategy: `with_rank_growth(FedAvgLoRA)`.

The wrapped strategy aggregates as it always does (FedSVD re-factors, user-level DP adds its noise); then
`server/rank_growth.py` scores the layers from the global before the round and that aggregate, and the new
global has one more rank on the chosen layers. Only the aggregate is read, so growth is post-processing.
What travels is unchanged in kind: the grown global is the next round's broadcast (every client of a round
receives the same shapes and fits its layers to them), and replies must have the grown shapes, which the
base class's shape check enforces. The carried scores (IncreLoRA's EMA) and the growth log are part of the
strategy's checkpointed state, so a resumed run grows as an uninterrupted one would.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from common.errors import ConfigError
from common.logs import get_logger
from common.payload import from_record
from server.rank_growth import RANK_GROWTH, GrowthSettings, grow, layer_ranks, plan_growth
from server.strategies.base import LoRAStrategy

log = get_logger("server")


class RankGrowth:
    """Mixin: put before a LoRAStrategy in the bases (see `with_rank_growth`)."""

    def init_growth(self, config) -> None:
        self.growth_rule = RANK_GROWTH[config.rank_growth]
        self.growth = GrowthSettings(budget=config.rank_growth_budget, per_round=config.rank_growth_per_round,
                                     ema=config.rank_growth_ema, num_rounds=config.num_rounds,
                                     start_rank=config.rank, seed=config.seed)
        self.growth_scores: dict[str, float] = {}
        self.growth_log: list[dict] = []  # {"round", "layers"} for every round that grew something

    @classmethod
    def from_config(cls, config, run_dir: str):
        strategy = super().from_config(config, run_dir)
        strategy.init_growth(config)
        return strategy

    def aggregate_payloads(self, payloads: list[dict[str, np.ndarray]], weights: list[float], nodes: list[int],
                           server_round: int) -> dict[str, np.ndarray]:
        new = super().aggregate_payloads(payloads, weights, nodes, server_round)
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            return new  # the base class skips this round; nothing is scored from it
        layers, self.growth_scores = plan_growth(self.growth_rule, self.global_arrays, new, self.growth_scores,
                                                 self.growth, server_round)
        if not layers:
            return new
        grown = grow(new, layers, self.growth.seed, server_round)
        self.growth_log.append({"round": server_round, "layers": layers})
        log.info("round %d: rank growth (%s) adds one rank to %s; total rank %d", server_round,
                 self.growth_rule.summary.split(":")[0], ", ".join(layers), sum(layer_ranks(grown).values()))
        return grown

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and metrics is not None:
            metrics["rank-total"] = sum(layer_ranks(from_record(arrays)).values())  # metrics.json, per round
        return arrays, metrics

    def state_dict(self):
        state, arrays = super().state_dict()
        state["rank_growth"] = {"scores": self.growth_scores, "log": self.growth_log}
        return state, arrays

    def load_state_dict(self, state: dict, arrays) -> None:
        super().load_state_dict(state, arrays)
        saved = state.get("rank_growth", {})
        self.growth_scores = {name: float(v) for name, v in saved.get("scores", {}).items()}
        self.growth_log = list(saved.get("log", []))


def with_rank_growth(cls: type[LoRAStrategy]) -> type[LoRAStrategy]:
    """`cls` whose global adapter grows in rank between rounds; ConfigError where the shapes cannot follow."""
    if cls.rank_heterogeneous or cls.fold_global or cls.static_factors or cls.personal_factors:
        raise ConfigError(f"rank growth needs a strategy that sends every client the whole global B A and averages "
                          f"same-shaped replies; {cls.__name__} does not: use fedavg_lora or fedsvd")
    return type(f"RankGrowth{cls.__name__}", (RankGrowth, cls), {})
