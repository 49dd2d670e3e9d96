"""Training losses by name (run config `loss`): what a client's DP-SGD steps minimize.

Per-sample clipping bounds one example's influence only if the batch loss is a mean of per-example terms
ℓ(x_i): the gradient Opacus clips for example i is then ∇ℓ(x_i), a function of x_i alone. A term that couples
the examples of a batch (a covariance over the batch) gives example i a gradient that depends on the other
examples too, so clipping it no longer bounds what one example changes: such a term is refused under DP
(`batch_coupling`, checked in `compatibility.py`). `tests/test_losses.py` checks that Opacus' per-sample
gradients of every allowed loss equal the gradients of one example at a time, and that the refused term
really couples the batch.

`ba_lora` (BA-LoRA, Chang et al. 2024, card 32; reference code cyp-jlu-ai/BA-LoRA, its NLU terms):
  L = CE + λ1 · mean_i ‖ẑ_i − ẑ_i^base‖² / C + λ2 · Σ_{j≠k} Cov(z)_jk² / C,   ẑ = z / ‖z‖₂,
with z_i the logits (C classes) and z^base those of the same model with every adapter switched off, under
no_grad and in eval mode (the reference's frozen pre-trained copy; the head is the one being trained, since a
new classifier head has no pre-trained logits). The consistency term (λ1, `ba-lora-consistency`) is per example;
the base forward reads the same private example and is covered by the same clipping. The diversity term
(λ2, `ba-lora-diversity`) is a covariance over the batch: refused under DP, allowed without (target-epsilon =
inf). It is refused rather than restructured: a sequence classifier has one logit vector per example, so there
is no within-example covariance to turn it into (the card's per-sample route, over the tokens of one sequence,
exists for generation only). The SVD term λ3 is left out: the reference computes its SVD under no_grad, so it
adds no gradient, and over a batch it would couple the examples as well.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common.adapters.base import AdapterLayer
from common.config import RunConfig
from common.errors import ConfigError


@dataclass(frozen=True)
class BoundLoss:
    """What `train_locally` needs: the batch-mean loss, and whether it takes the base model's logits."""

    fn: Callable[..., torch.Tensor]  # (logits, labels) or, with base_logits, (logits, labels, base logits)
    base_logits: bool = False


@dataclass(frozen=True)
class TrainingLoss:
    make: Callable[[RunConfig], BoundLoss]
    # (run config) -> "" when the loss is a mean of per-example terms, else the term that couples the batch
    batch_coupling: Callable[[RunConfig], str]
    summary: str


def consistency(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """mean_i ‖ẑ_i − ẑ_i^base‖² / C with ẑ = z / ‖z‖₂: a batch mean of per-example terms."""
    return F.mse_loss(F.normalize(logits, dim=-1), F.normalize(base_logits, dim=-1))


def diversity(logits: torch.Tensor) -> torch.Tensor:
    """Σ of the squared off-diagonal entries of the logits' covariance over the batch, / C (0 for one example)."""
    batch, classes = logits.shape
    if batch < 2:
        return logits.sum() * 0.0
    centered = logits - logits.mean(dim=0)
    covariance = centered.T @ centered / (batch - 1)
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    return (off_diagonal**2).sum() / classes


def ba_lora_loss(consistency_weight: float, diversity_weight: float) -> Callable[..., torch.Tensor]:
    """CE + λ1 consistency + λ2 diversity; a weight of 0 leaves its term out (CE bit for bit at 0, 0)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, labels)
        if consistency_weight:
            total = total + consistency_weight * consistency(logits, base_logits)
        if diversity_weight:
            total = total + diversity_weight * diversity(logits)
        return total

    return loss


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Every unmerged adapter layer computes its base W0 x only: a merged layer skips its branch
    (`AdapterLayer.forward`), so marking an unmerged one merged switches it off without touching a weight."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and not m.merged]
    for layer in layers:
        layer.merged = True
    try:
        yield
    finally:
        for layer in layers:
            layer.merged = False


def base_model_logits(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The logits with every adapter off, in eval mode (no dropout) and without gradient: Opacus records
    nothing for this forward (its hooks skip when grad is disabled)."""
    training = model.training
    try:
        with torch.no_grad(), adapters_off(model):
            model.eval()
            return model(**inputs).logits
    finally:
        model.train(training)


TRAINING_LOSSES: dict[str, TrainingLoss] = {
    "cross_entropy": TrainingLoss(
        make=lambda c: BoundLoss(F.cross_entropy),
        batch_coupling=lambda c: "",
        summary="cross-entropy, the batch mean over examples: fedlora's default",
    ),
    "ba_lora": TrainingLoss(
        make=lambda c: BoundLoss(ba_lora_loss(c.ba_lora_consistency, c.ba_lora_diversity), base_logits=True),
        batch_coupling=lambda c: (f"ba-lora-diversity = {c.ba_lora_diversity:g} (BA-LoRA's covariance of the "
                                  f"logits over the batch)" if c.ba_lora_diversity else ""),
        summary="BA-LoRA: cross-entropy + consistency with the base model's normalized logits (+ diversity, "
                "without DP only)",
    ),
}


def get_training_loss(name: str) -> TrainingLoss:
    if name not in TRAINING_LOSSES:
        raise ConfigError(f"unknown loss {name!r}; available: {', '.join(sorted(TRAINING_LOSSES))}")
    return TRAINING_LOSSES[name]


def training_loss(config: RunConfig) -> BoundLoss:
    return get_training_loss(config.loss).make(config)
