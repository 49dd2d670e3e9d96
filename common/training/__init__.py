"""Composable training pieces, each selected in the run config and each post-processing under DP-SGD.

- update rule (`update-rule`, `update_rules.py`): the optimizer applied to the privatized gradient
  (`adam` default, `sgd`, `galore` with `galore-projection` svd or dct, `frugal`, `lora_pro`);
- rank schedule (`rank-schedule`, `rank_schedules.py`): which ranks train at each step (`none`, `dylora`);
- proximal steps on parameters after the update (`prox.py`: SoRA's gate soft-threshold, with adapter `sora`;
  `codyra.py`: CoDyRA's scheduled soft-threshold of its rank-importance weights, with adapter `codyra`);
- ALLoRA's per-row step size 1/sqrt(‖row‖² + 1/η²) on the update of A and B (`allora.py`, adapter `allora`);
- LoRA-GGPO's weight perturbation (`ggpo-rho` > 0, `ggpo.py`): each step's forward at W + ε, ε scaled by the
  previous step's private gradient and the weights;
- the training loss (`loss`, `losses.py`): cross-entropy, or BA-LoRA's regularized loss; the one piece that
  acts before privatization, so it must stay a mean of per-example terms under DP.

`pieces.py` fixes the order of one step (privatize, then the pieces and the rule); `compatibility.py`
refuses combinations that cannot train correctly. Everything here runs on the client; nothing reads raw
(unclipped or unnoised) gradients, and every random choice is seeded from the run config and the round.
"""

from __future__ import annotations

from torch import nn

from common.config import RunConfig
from common.training.allora import ALLoRAStep
from common.training.codyra import CoDyRAProx
from common.training.ggpo import GGPOPerturbation
from common.training.losses import TRAINING_LOSSES, base_model_logits, training_loss
from common.training.pieces import StepPiece, privatize_then_update
from common.training.prox import GateProx
from common.training.rank_schedules import RANK_SCHEDULES, get_rank_schedule
from common.training.update_rules import UPDATE_RULES, get_update_rule, head_parameters, optimizer_factory


def step_pieces(config: RunConfig, model: nn.Module, server_round: int) -> list[StepPiece]:
    """The pieces of one round, in hook order: SoRA's gate prox (if the model has gates and `sora-lambda`
    > 0), CoDyRA's (if it has importance weights and `codyra-kappa` > 0), ALLoRA's per-row step scale (if it
    has ALLoRA layers), then the rank schedule, whose `after_update` comes last so that ranks it masked stay untouched,
    then LoRA-GGPO's perturbation (`ggpo-rho` > 0), which reads the private gradient before anything rewrites
    it, then the update rule's own gradient piece (LoRA-Pro), whose `before_update` runs just before its step."""
    pieces: list[StepPiece] = []
    prox = GateProx(model, config.lr, config.sora_lambda)
    if prox.gates and prox.tau > 0:
        pieces.append(prox)
    codyra = CoDyRAProx(model, config.codyra_kappa, config.codyra_levels, config.codyra_dense, config.local_steps,
                        config.num_rounds, server_round)
    if codyra.gates and config.codyra_kappa > 0:
        pieces.append(codyra)
    allora = ALLoRAStep(model, config.allora_eta)
    if allora.factors:
        pieces.append(allora)
    schedule = get_rank_schedule(config.rank_schedule).make(config, model, server_round)
    if schedule is not None:
        pieces.append(schedule)
    if config.ggpo_rho > 0:
        pieces.append(GGPOPerturbation(model, config.ggpo_rho, config.ggpo_grad_weight, config.ggpo_weight_weight,
                                       config.seed, server_round))
    rule = get_update_rule(config.update_rule)
    if rule.gradient_piece is not None:
        pieces.append(rule.gradient_piece(model))
    return pieces


__all__ = ["RANK_SCHEDULES", "TRAINING_LOSSES", "UPDATE_RULES", "StepPiece", "base_model_logits",
           "get_rank_schedule", "get_update_rule", "head_parameters", "optimizer_factory", "privatize_then_update",
           "step_pieces",
           "training_loss"]
