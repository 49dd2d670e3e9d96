"""Update rules by name (run config `update-rule`): what turns the privatized gradient into a step.

Each rule builds a `torch.optim.Optimizer` over the trainable parameters; Opacus wraps it, and
`common/training/pieces.py` calls its `step()` only after clipping and noise, so the rule reads nothing
but the private gradient: any rule is post-processing and costs no privacy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from common.config import RunConfig
from common.errors import ConfigError
from common.training.galore import GaLoreAdam

# (trainable (name, parameter) pairs in model order, learning rate) -> optimizer
OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]], float], torch.optim.Optimizer]


@dataclass(frozen=True)
class UpdateRule:
    make: Callable[[RunConfig], OptimizerFactory]  # binds the rule's own run-config settings
    summary: str


def _params(named: list[tuple[str, nn.Parameter]]) -> list[nn.Parameter]:
    return [p for _, p in named]


UPDATE_RULES: dict[str, UpdateRule] = {
    "adam": UpdateRule(
        make=lambda c: lambda named, lr: torch.optim.Adam(_params(named), lr=lr),
        summary="Adam (torch defaults) on the private gradient: fedlora's default",
    ),
    "sgd": UpdateRule(
        make=lambda c: lambda named, lr: torch.optim.SGD(_params(named), lr=lr),
        summary="plain SGD: the DP-SGD update of the textbook",
    ),
    "galore": UpdateRule(
        make=lambda c: lambda named, lr: GaLoreAdam(_params(named), lr=lr, rank=c.galore_rank,
                                                   period=c.galore_period, scale=c.galore_scale),
        summary="GaLore: Adam with moments in a rank-`galore-rank` projection of each matrix's private gradient",
    ),
}


def get_update_rule(name: str) -> UpdateRule:
    if name not in UPDATE_RULES:
        raise ConfigError(f"unknown update-rule {name!r}; available: {', '.join(sorted(UPDATE_RULES))}")
    return UPDATE_RULES[name]


def optimizer_factory(config: RunConfig) -> OptimizerFactory:
    return get_update_rule(config.update_rule).make(config)
