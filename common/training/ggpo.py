"""LoRA-GGPO (Chang et al. 2025, card 34): train LoRA at a randomly perturbed full weight W + ε, with each
row's perturbation scaled by that row's gradient and weight norms (cheap sharpness-aware training).

Each step draws ε (d_out x d_in) with rows ε_i ~ N(0, std_i² I),

  std_i = ρ (λ_g ‖G_i‖ + λ_w ‖W_i‖) / √d_in,      W = W0 + s B A,

(`ggpo-rho` ρ, `ggpo-grad-weight` λ_g, `ggpo-weight-weight` λ_w), adds ε x to the layer's output for that
step's forward and backward only, and drops it before the update: gradients flow into A and B as usual,
ε is never a parameter and never stored in the model. G is the full-weight direction of the previous step,
the equivalent gradient s (B g_A + g_B A) of its privatized LoRA gradients (0 at a round's first step).

Why this is post-processing under DP-SGD: ε is a function of the previous step's *privatized* gradient, of the
parameters, and of fresh randomness from a generator seeded by (seed, round) that is not Opacus' noise
generator; none of it reads this step's data. Opacus then computes exact per-sample gradients at the perturbed
point W + ε (its hooks on A and B see that forward), clips and noises them as always: each step is an ordinary
DP-SGD step at a point chosen from earlier releases, which adaptive composition covers. A G taken from the
clean batch gradient would leak, and is not what this does.

Decisions (the card marks them "unsure"): the card's std formula with λ_g = λ_w = 0.5 by default; G from the
equivalent gradient above (of one factor when the other is frozen: s g_B A for FFA-LoRA and FedSVD); only plain
LoRA pairs (adapters `lora`, `diffora`), whose W is W0 + s B A.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.adapters.lora import LoRALinear, seed_for
from common.errors import ConfigError
from common.training.lora_pro import equivalent_gradient
from common.training.pieces import StepPiece


def row_std(grad_rows: torch.Tensor, weight_rows: torch.Tensor, d_in: int, rho: float, grad_weight: float,
            weight_weight: float) -> torch.Tensor:
    """std_i = ρ (λ_g ‖G_i‖ + λ_w ‖W_i‖) / √d_in from the row norms ‖G_i‖ and ‖W_i‖."""
    return rho * (grad_weight * grad_rows + weight_weight * weight_rows) / math.sqrt(d_in)


def perturbation(std: torch.Tensor, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """ε (len(std) x d_in) with row i ~ N(0, std_i² I), drawn on the CPU from `generator`."""
    return std.detach().cpu().unsqueeze(1) * torch.randn(len(std), d_in, generator=generator, dtype=std.dtype)


class GGPOPerturbation(StepPiece):
    """ε on every plain `LoRALinear`'s output during each step's forward and backward, dropped before the update."""

    def __init__(self, model: nn.Module, rho: float, grad_weight: float, weight_weight: float, seed: int,
                 server_round: int):
        self.layers = [m for m in model.modules() if type(m) is LoRALinear]
        if not self.layers:
            raise ConfigError("ggpo-rho > 0 perturbs W0 + s B A of plain LoRA layers, and this model has none: use "
                              "adapter 'lora' or 'diffora', or ggpo-rho = 0")
        self.rho, self.grad_weight, self.weight_weight = rho, grad_weight, weight_weight
        self.generator = torch.Generator().manual_seed(seed_for(seed, f"ggpo-round-{server_round}"))
        self.grad_rows = [torch.zeros(layer.base.out_features) for layer in self.layers]
        self.noise: dict[nn.Module, torch.Tensor] = {}
        self.hooks = [layer.register_forward_hook(self._perturb) for layer in self.layers]

    def _perturb(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        eps = self.noise.get(layer)
        return None if eps is None else output + F.linear(inputs[0], eps.to(device=output.device, dtype=output.dtype))

    @torch.no_grad()
    def before_forward(self, step: int) -> None:
        self.noise = {}
        for layer, grad_rows in zip(self.layers, self.grad_rows):
            weight = layer.base.weight.float() + layer.delta_weight().float()
            std = row_std(grad_rows, weight.norm(dim=1).cpu(), layer.base.in_features, self.rho, self.grad_weight,
                          self.weight_weight)
            self.noise[layer] = perturbation(std, layer.base.in_features, self.generator)

    @torch.no_grad()
    def before_update(self) -> None:
        self.noise = {}  # the update, and the next forward until `before_forward`, see W, not W + ε
        for i, layer in enumerate(self.layers):
            a, b = layer.lora_A.weight, layer.lora_B.weight
            direction = equivalent_gradient(a.detach(), b.detach(), a.grad, b.grad, layer.scaling)
            if direction is not None:
                self.grad_rows[i] = direction.float().norm(dim=1).cpu()

    def close(self) -> None:
        self.noise = {}
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
