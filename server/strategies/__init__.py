"""Aggregation strategies by name: the run config's `strategy` picks one from this registry."""

from __future__ import annotations

from common.adapters import get_adapter
from common.adapters.lora_inits import strategy_problem
from common.errors import ConfigError
from server.strategies.base import LoRAStrategy
from server.strategies.fedavg_lora import FedAvgLoRA
from server.strategies.fedsvd import FedSVD
from server.strategies.fedsa_lora import FedSALoRA
from server.strategies.fedsvd_het import FedSVDHet
from server.strategies.ffa_lora import FFALoRA
from server.strategies.flexlora import FlexLoRA
from server.strategies.flora import FLoRA
from server.strategies.hetlora import HetLoRA
from server.strategies.lora_lego import LoRALEGO

STRATEGIES: dict[str, type[LoRAStrategy]] = {
    "fedavg_lora": FedAvgLoRA,
    "ffa_lora": FFALoRA,
    "fedsvd": FedSVD,
    "fedsa_lora": FedSALoRA,  # personalized: A shared, each client keeps its own B
    # rank-heterogeneous: clients may train different ranks (run config client-ranks, node-config rank)
    "hetlora": HetLoRA,
    "flexlora": FlexLoRA,
    "flora": FLoRA,
    "lora_lego": LoRALEGO,
    "fedsvd_het": FedSVDHet,
}


def get_strategy(name: str) -> type[LoRAStrategy]:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def check_compatible(strategy: str, adapter: str, client_ranks: tuple[int, ...] = (), lora_init: str = "default"
                     ) -> None:
    """A strategy whose math needs LoRA's A and B cannot run an adapter that trains other factors;
    clients of different ranks need a rank-heterogeneous strategy; a `lora-init` start must reach every client."""
    cls = get_strategy(strategy)
    problem = strategy_problem(lora_init, cls)
    if problem:
        fits = sorted(name for name, c in STRATEGIES.items() if not strategy_problem(lora_init, c))
        raise ConfigError(f"lora-init = {lora_init!r} {problem} (strategy {strategy!r}): use strategy {' or '.join(repr(f) for f in fits)}, "
                          f"or lora-init = 'default'")
    if client_ranks and not cls.rank_heterogeneous:
        hetero = sorted(name for name, c in STRATEGIES.items() if c.rank_heterogeneous)
        raise ConfigError(f"client-ranks needs a rank-heterogeneous strategy, and {strategy!r} is not one: "
                          f"use one of {', '.join(hetero)}, or client-ranks = \"\"")
    if cls.adapters and adapter not in cls.adapters:
        raise ConfigError(f"strategy {strategy!r} merges adapter(s) {', '.join(cls.adapters)} only, not "
                          f"{adapter!r}: use adapter {cls.adapters[0]!r} or another strategy")
    needed = set(cls.required_factors)
    kind = get_adapter(adapter)
    trained = set(kind.trainable_factors)
    if not needed <= trained:
        fits = sorted(name for name, cls in STRATEGIES.items() if set(cls.required_factors) <= trained)
        raise ConfigError(
            f"strategy {strategy!r} needs an adapter with {' and '.join(sorted(needed))}; adapter {adapter!r} "
            f"trains {', '.join(kind.trainable_factors)}: use strategy {' or '.join(repr(f) for f in fits)}"
        )
    if kind.rank_identity_matters and cls.reorders_ranks:
        fits = sorted(name for name, c in STRATEGIES.items() if set(c.required_factors) <= trained
                      and not c.reorders_ranks and (not c.adapters or adapter in c.adapters))
        raise ConfigError(
            f"strategy {strategy!r} re-factors B A into new ranks each round, but each rank of adapter {adapter!r} "
            f"{kind.rank_identity_reason}: use strategy {' or '.join(repr(f) for f in fits)}"
        )


__all__ = ["STRATEGIES", "LoRAStrategy", "check_compatible", "get_strategy"]
