"""Update rules by name (run config `update-rule`): what turns the privatized gradient into a step.

Each rule builds a `torch.optim.Optimizer` over the trainable parameters; Opacus wraps it, and
`common/training/pieces.py` calls its `step()` only after clipping and noise, so the rule reads nothing
but the private gradient: any rule is post-processing and costs no privacy. A rule may also bring a
`gradient_piece` that rewrites the private gradient just before its step (LoRA-Pro's correction needs the
model's LoRA pairs, frozen factors included, which the optimizer's trainable parameters do not carry):
`common.training.step_pieces` adds it last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from common.config import RunConfig
from common.errors import ConfigError
from common.training.frugal import FrugalAdam
from common.training.galore import GaLoreAdam
from common.training.lora_pro import PLAIN_LORA, LoRAProCorrection
from common.training.pieces import StepPiece

# (trainable (name, parameter) pairs in model order, learning rate) -> optimizer
OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]], float], torch.optim.Optimizer]


@dataclass(frozen=True)
class UpdateRule:
    make: Callable[[RunConfig], OptimizerFactory]  # binds the rule's own run-config settings
    summary: str
    gradient_piece: Callable[[nn.Module], StepPiece] | None = None  # (model) -> piece run before the step
    adapters: tuple[str, ...] = ()  # the adapters it can train; () = any
    projected: bool = False  # reads `galore-projection`


class NamedParameters(list):
    """The (name, parameter) pairs an optimizer gets, with the names of the classifier head and its own learning
    rate (`head-lr`, 0 = the optimizer's)."""

    def __init__(self, named, head: frozenset[str], head_lr: float):
        super().__init__(named)
        self.head, self.head_lr = head, head_lr


def _params(named: list[tuple[str, nn.Parameter]]) -> list:
    """The parameters, or, when the head is known, two torch param groups: the adapters, and the head, which
    projected rules (GaLore, FRUGAL) step with plain Adam (`project = False`) and `head-lr` may speed up."""
    head = getattr(named, "head", frozenset())
    if not head:
        return [p for _, p in named]
    head_group = {"params": [p for n, p in named if n in head], "project": False}
    if named.head_lr:
        head_group["lr"] = named.head_lr
    return [group for group in ({"params": [p for n, p in named if n not in head]}, head_group) if group["params"]]


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
                                                   period=c.galore_period, scale=c.galore_scale,
                                                   projection=c.galore_projection),
        summary="GaLore: Adam with moments in a rank-`galore-rank` projection of each matrix's private gradient",
        projected=True,
    ),
    "frugal": UpdateRule(
        make=lambda c: lambda named, lr: FrugalAdam(_params(named), lr=lr, density=c.frugal_density,
                                                   period=c.frugal_period, sign_lr_scale=c.frugal_sign_lr_scale,
                                                   projection=c.galore_projection),
        summary="FRUGAL: Adam in a `frugal-density` subspace of each matrix's private gradient, signSGD on the rest",
        projected=True,
    ),
    "lora_pro": UpdateRule(
        make=lambda c: lambda named, lr: torch.optim.Adam(_params(named), lr=lr),
        summary="LoRA-Pro: each LoRA pair's private gradients corrected so that s (B g_A + g_B A) is the best "
                "approximation of the full-weight gradient, then Adam",
        gradient_piece=LoRAProCorrection,
        adapters=PLAIN_LORA,
    ),
}


def get_update_rule(name: str) -> UpdateRule:
    if name not in UPDATE_RULES:
        raise ConfigError(f"unknown update-rule {name!r}; available: {', '.join(sorted(UPDATE_RULES))}")
    return UPDATE_RULES[name]


def optimizer_factory(config: RunConfig, head: frozenset[str] = frozenset()) -> OptimizerFactory:
    """The run's update rule; the tensors named in `head` form their own param group (see `_params`)."""
    make = get_update_rule(config.update_rule).make(config)
    if not head:
        return make
    return lambda named, lr: make(NamedParameters(named, head, config.head_lr), lr)


def head_parameters(model: nn.Module) -> frozenset[str]:
    """The trainable tensors outside every adapter layer and the input embeddings: the classifier head."""
    from common.adapters.base import AdapterLayer

    inside = {f"{name}.{child}" for name, module in model.named_modules() if isinstance(module, AdapterLayer)
              for child, _ in module.named_parameters()}
    embeddings = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    return frozenset(name for name, p in model.named_parameters()
                     if p.requires_grad and name not in inside and p is not embeddings)
