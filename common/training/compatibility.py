"""Combinations of update rule, rank schedule, adapter and rank settings that cannot train correctly.

Run from `RunConfig.validate`, so the server, the demo and every client stop with one line before any data
is read or budget spent. Strategy combinations live with the strategies (`server/strategies/__init__.py`:
SoRA refuses the strategies that re-factor ranks through its `rank_identity_matters`).
"""

from __future__ import annotations

from common.adapters.registry import ADAPTERS, get_adapter
from common.config import RunConfig
from common.errors import ConfigError
from common.training.rank_schedules import get_rank_schedule
from common.training.update_rules import get_update_rule


def check_training(config: RunConfig) -> None:
    get_update_rule(config.update_rule)
    schedule = get_rank_schedule(config.rank_schedule)
    if schedule.adapters and config.adapter not in schedule.adapters:
        kind = ADAPTERS.get(config.adapter)
        has = f"trains {', '.join(kind.trainable_factors)}" if kind else "is unknown"
        raise ConfigError(
            f"rank-schedule = {config.rank_schedule!r} truncates the rank dimension of a LoRA pair B A, and "
            f"adapter {config.adapter!r} {has}, without a rank the schedule can mask: use adapter "
            f"{' or '.join(repr(a) for a in schedule.adapters)}, or rank-schedule = 'none'"
        )
    if schedule.adapters:
        get_adapter(config.adapter)
        if config.client_ranks:
            raise ConfigError(
                f"rank-schedule = {config.rank_schedule!r} cannot be combined with client-ranks yet: its scale "
                f"alpha/b differs from the common alpha/r_max that zero-padded rank-heterogeneous merging needs; "
                f"use client-ranks = \"\" or rank-schedule = 'none'"
            )
