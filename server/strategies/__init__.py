"""Aggregation strategies by name: the run config's `strategy` picks one from this registry."""

from __future__ import annotations

from common.adapters import get_adapter
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


def check_compatible(strategy: str, adapter: str) -> None:
    """A strategy whose math needs LoRA's A and B cannot run an adapter that trains other factors."""
    needed = set(get_strategy(strategy).required_factors)
    kind = get_adapter(adapter)
    trained = set(kind.trainable_factors)
    if not needed <= trained:
        fits = sorted(name for name, cls in STRATEGIES.items() if set(cls.required_factors) <= trained)
        raise ConfigError(
            f"strategy {strategy!r} needs an adapter with {' and '.join(sorted(needed))}; adapter {adapter!r} "
            f"trains {', '.join(kind.trainable_factors)}: use strategy {' or '.join(repr(f) for f in fits)}"
        )


__all__ = ["STRATEGIES", "LoRAStrategy", "check_compatible", "get_strategy"]
