"""Aggregation strategies by name: the run config's `strategy` picks one from this registry."""

from __future__ import annotations

from common.errors import ConfigError
from server.strategies.base import LoRAStrategy
from server.strategies.fedavg_lora import FedAvgLoRA
from server.strategies.fedsvd import FedSVD
from server.strategies.ffa_lora import FFALoRA

STRATEGIES: dict[str, type[LoRAStrategy]] = {
    "fedavg_lora": FedAvgLoRA,
    "ffa_lora": FFALoRA,
    "fedsvd": FedSVD,
}


def get_strategy(name: str) -> type[LoRAStrategy]:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "LoRAStrategy", "get_strategy"]
