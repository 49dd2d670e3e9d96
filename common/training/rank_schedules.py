"""Rank schedules by name (run config `rank-schedule`): which of the adapter's ranks train at each step.

A schedule is a `StepPiece` (`pieces.py`) built per round from the run config and the round number only:
data-independent, so it costs no privacy, and every client of a round follows the same schedule.
`adapters` lists the adapters whose layers the schedule can drive (`LoRALinear.rank_mask`); any other is
refused before training (`compatibility.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from common.config import RunConfig
from common.errors import ConfigError
from common.training.dylora import DyLoRASchedule
from common.training.pieces import StepPiece


@dataclass(frozen=True)
class RankSchedule:
    # (run config, model, server round) -> the round's piece, or None for no schedule
    make: Callable[[RunConfig, nn.Module, int], StepPiece | None]
    adapters: tuple[str, ...] = ()  # adapters it can drive; () = any (the "none" schedule)
    summary: str = ""


RANK_SCHEDULES: dict[str, RankSchedule] = {
    "none": RankSchedule(make=lambda c, model, server_round: None, summary="every rank trains every step"),
    "dylora": RankSchedule(
        make=lambda c, model, server_round: DyLoRASchedule(model, c.seed, server_round, c.local_steps),
        adapters=("lora", "sora"),
        summary="DyLoRA: each step trains the first b ~ Uniform{1..rank} ranks at scale alpha/b, b seeded by "
                "(seed, round)",
    ),
}


def get_rank_schedule(name: str) -> RankSchedule:
    if name not in RANK_SCHEDULES:
        raise ConfigError(f"unknown rank-schedule {name!r}; available: {', '.join(sorted(RANK_SCHEDULES))}")
    return RANK_SCHEDULES[name]
