"""Adapter registry: a run config names an adapter; nothing else in the code base names a method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from common.adapters.lora import LoRAConfig, LoRALinear
from common.config import RunConfig
from common.errors import ConfigError


@dataclass(frozen=True)
class AdapterKind:
    """How to build one adapter family from the run config and wrap a base `nn.Linear` with it."""

    make_config: Callable[[RunConfig], object]
    wrap: Callable[[nn.Linear, object, str], nn.Module]
    factor_names: tuple[str, ...]  # trainable sub-modules, e.g. ("lora_A", "lora_B")


ADAPTERS: dict[str, AdapterKind] = {
    "lora": AdapterKind(
        make_config=lambda c: LoRAConfig(
            rank=c.rank, alpha=c.alpha, dropout=c.lora_dropout, target_modules=c.target_module_names,
            seed=c.seed,
        ),
        wrap=LoRALinear,
        factor_names=("lora_A", "lora_B"),
    ),
}


def get_adapter(name: str) -> AdapterKind:
    if name not in ADAPTERS:
        raise ConfigError(f"unknown adapter {name!r}; available: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]
