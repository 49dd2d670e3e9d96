"""Composable training pieces, each selected in the run config and each post-processing under DP-SGD.

- update rule (`update-rule`, `update_rules.py`): the optimizer applied to the privatized gradient
  (`adam` default, `sgd`, `galore`);
- rank schedule (`rank-schedule`, `rank_schedules.py`): which ranks train at each step (`none`, `dylora`);
- proximal steps on parameters after the update (`prox.py`: SoRA's gate soft-threshold, with adapter `sora`).

`pieces.py` fixes the order of one step (privatize, then the pieces and the rule); `compatibility.py`
refuses combinations that cannot train correctly. Everything here runs on the client; nothing reads raw
(unclipped or unnoised) gradients, and every random choice is seeded from the run config and the round.
"""

from __future__ import annotations

from torch import nn

from common.config import RunConfig
from common.training.pieces import StepPiece, privatize_then_update
from common.training.prox import GateProx
from common.training.rank_schedules import RANK_SCHEDULES, get_rank_schedule
from common.training.update_rules import UPDATE_RULES, get_update_rule, optimizer_factory


def step_pieces(config: RunConfig, model: nn.Module, server_round: int) -> list[StepPiece]:
    """The pieces of one round, in hook order: SoRA's gate prox (if the model has gates and `sora-lambda`
    > 0), then the rank schedule, whose `after_update` comes last so that ranks it masked stay untouched."""
    pieces: list[StepPiece] = []
    prox = GateProx(model, config.lr, config.sora_lambda)
    if prox.gates and prox.tau > 0:
        pieces.append(prox)
    schedule = get_rank_schedule(config.rank_schedule).make(config, model, server_round)
    if schedule is not None:
        pieces.append(schedule)
    return pieces


__all__ = ["RANK_SCHEDULES", "UPDATE_RULES", "StepPiece", "get_rank_schedule", "get_update_rule",
           "optimizer_factory", "privatize_then_update", "step_pieces"]
