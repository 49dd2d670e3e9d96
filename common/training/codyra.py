"""CoDyRA's proximal step: after each optimizer step, w <- S_τ(w) on every rank-importance weight, with the
threshold τ_t of the reference code's schedule (Artificer-AI-Lab/CoDyRA, `models/codyra.py`).

Over a run of T steps: no pruning in the dense phase, the first D = `codyra-dense` · T steps; then τ climbs a
staircase over `codyra-levels` = J levels, τ = κ · level / (J - 1) (`codyra-kappa` κ), one level up every
S = max(1, ⌊(T - D) / J⌋) steps at the multiples of S, held at κ once reached. The reference prunes only
after step D and keeps τ = 0 when S would be 0; fedlora's runs are short (T = num-rounds x local-steps, e.g.
30), so S is at least 1 step (`codyra_threshold` is checked against the reference's loop in the tests).

The federated step count is t = (round - 1) · local-steps + step: the same for every client of a round and
data-independent, like DyLoRA's ranks. S_τ(w) = sign(w) max(|w| - τ, 0) reads only w, never data or raw
gradients, so it is post-processing of the privatized update and costs no privacy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.training.pieces import StepPiece
from common.training.prox import soft_threshold


def codyra_threshold(step: int, total: int, kappa: float, levels: int, dense: float) -> float:
    """τ at 0-based step `step` of `total`: 0 until step D = dense·total (inclusive), then the staircase."""
    start = dense * total
    if step <= start:
        return 0.0
    every = max(1, int((total - start) // levels))
    level = min(step // every - math.ceil(start / every) + 1, levels - 1)
    return kappa * level / (levels - 1)


class CoDyRAProx(StepPiece):
    """After each update, w <- S_τ(w) on every trainable `<...>.codyra_gate.weight`, τ from the run's schedule."""

    def __init__(self, model: nn.Module, kappa: float, levels: int, dense: float, local_steps: int, num_rounds: int,
                 server_round: int):
        self.gates = [p for name, p in model.named_parameters()
                      if p.requires_grad and name.endswith("codyra_gate.weight")]
        self.schedule = (num_rounds * local_steps, kappa, levels, dense)
        self.offset = (server_round - 1) * local_steps
        self.tau = 0.0

    def before_forward(self, step: int) -> None:
        self.tau = codyra_threshold(self.offset + step, *self.schedule)

    def after_update(self) -> None:
        if self.tau <= 0:
            return
        with torch.no_grad():
            for gate in self.gates:
                gate.copy_(soft_threshold(gate, self.tau))
