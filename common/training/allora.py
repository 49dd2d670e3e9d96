"""ALLoRA's adaptive step (card 12): each row of A and B moves by its update times c = 1/sqrt(‖row‖² + 1/η²).

c is η at a zero row (B at the start leaves 0 at η times the update rule's step, the paper's fix for LoRA's
slow start from B = 0) and about 1/‖row‖ once ‖row‖ ≫ 1/η (large rows move less: a per-row learning rate).

Decisions (the card marks them "unsure"):
- rows as stored, A (r x d_in) per rank and B (d_out x r) per output unit: the paper's W + A B has its A on
  the output side, so its "rows" of both factors are these;
- c scales the *update* of the run's update rule (θ ← θ_old + c ⊙ (θ_rule − θ_old)), not the gradient: under
  Adam a gradient scale that changes slowly cancels in m̂/√v̂, and the paper calls it an adaptive learning
  rate; with SGD both are the same, θ ← θ − lr c ⊙ g;
- c is taken at the parameters before the step, and applied after Opacus' clipping and noise, not per
  sample before clipping: it reads the parameters only, never data, so it is post-processing of the private
  gradient and costs no privacy, and clipping keeps its usual geometry;
- η = 2 by default (`allora-eta`): a fresh B then moves at twice the rule's step, as default LoRA's B does
  through its α/r = 16/8; the classifier head takes the rule's step unscaled.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.allora import ALLoRALinear
from common.training.pieces import StepPiece


def allora_coefficient(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """c_i = 1/sqrt(‖w_i‖² + 1/η²) for each row w_i of a matrix, as a column (rows x 1) to broadcast."""
    return torch.rsqrt(weight.pow(2).sum(dim=1, keepdim=True) + 1.0 / eta**2)


class ALLoRAStep(StepPiece):
    """Scale the update of every trainable A and B of the model's ALLoRA layers row by row."""

    def __init__(self, model: nn.Module, eta: float):
        self.factors = [p for m in model.modules() if isinstance(m, ALLoRALinear)
                        for p in (m.lora_A.weight, m.lora_B.weight) if p.requires_grad]
        self.eta = eta
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_update(self) -> None:
        self._before = [(p.detach().clone(), allora_coefficient(p.detach(), self.eta)) for p in self.factors]

    def after_update(self) -> None:
        with torch.no_grad():
            for p, (old, scale) in zip(self.factors, self._before):
                p.copy_(old + scale * (p - old))
        self._before = []
