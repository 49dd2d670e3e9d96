"""SMoRA (Zhao et al. 2025, "Each Rank Could be an Expert"): LoRA whose r ranks are experts, routed per token.

  z = W_g x (r logits),  p = softmax(z),  g = p on the k largest entries and 0 elsewhere,
  h = W0 x + s B (g ⊙ A x) = W0 x + s Σ_{i in topk} p_i b_i a_iᵀ x,   s = alpha / r,

with k = run config `smora-top-k`. A, B and the router W_g are `nn.Linear`s (B reads the gated A x), so
Opacus' own samplers give exact per-sample gradients in hooks mode, the router's included: the top-k
choice is a mask computed from z, and the gradient flows through the softmax values it keeps.

Not mergeable: g depends on the token, so there is no single ΔW; `merge` (and so export of a merged
model) and `delta_weight` refuse with a ConfigError, and the intruder metric skips these layers.
The rank <-> expert identity is what the router learns, so strategies that re-factor B A by an SVD
(FedSVD) are refused (`rank_identity_matters` in the registry). FedAvg of A, B, W_g is inexact, as for
LoRA; FFA-LoRA (A frozen at its seeded init, B and W_g trained) keeps each rank's A and so its identity.

Decisions (the card marks them "unsure"): no renormalization of the kept gates (the card's g =
TopK(softmax(z)); with k = r and a uniform router the adapter is LoRA with scale s / r). No load-balancing
bias: the paper's loss-free bias is updated from usage counts, a data-dependent update outside DP-SGD,
so it is left out (equivalently frozen at 0) rather than noised. W_g starts at a seeded Kaiming-uniform
(as LoRA's A, with its own seed) so tokens spread over the experts from the first step (a zero router
would send every token to ranks 0..k-1 and leave the other columns of B without gradient); A is LoRA's
seeded A and B = 0, so training starts at W0 and FFA-LoRA rebuilds A from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank
from common.adapters.lora import seed_for, seeded_lora_pair
from common.errors import ConfigError


@dataclass(frozen=True)
class SMoRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


def top_k_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """softmax(logits) on the k largest entries of the last axis, 0 elsewhere (not renormalized)."""
    probabilities = torch.softmax(logits, dim=-1)
    keep = torch.zeros_like(probabilities).scatter(-1, logits.topk(k, dim=-1).indices, 1.0)
    return probabilities * keep


class SMoRALinear(AdapterLayer):
    mergeable = False

    def __init__(self, base: nn.Linear, config: SMoRAConfig, name: str):
        super().__init__(base)
        if not 1 <= config.top_k <= config.rank:
            raise ConfigError(f"smora-top-k = {config.top_k} must be between 1 and rank = {config.rank}: "
                              f"it is how many of the r rank-1 experts each token activates")
        self.scaling = config.scaling
        self.top_k = config.top_k
        self.lora_A, self.lora_B = seeded_lora_pair(base, config.rank, seed_for(config.seed, name))
        self.smora_router, _ = seeded_lora_pair(base, config.rank, seed_for(config.seed, name + "/smora-router"))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g (..., r): each token's top-k softmax router probabilities."""
        return top_k_gates(self.smora_router(x), self.top_k)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.lora_B(self.gates(x) * self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        raise self._not_mergeable()

    def merge(self) -> None:
        raise self._not_mergeable()

    def _not_mergeable(self) -> ConfigError:
        return ConfigError("adapter 'smora' cannot be merged into the base weights: its router picks different "
                           "ranks for every token, so no single ΔW exists; keep the adapter unmerged (load the "
                           "run's adapter.safetensors with fedlora) or train a mergeable adapter such as 'lora'")


def smora_trainable_count(d_out: int, d_in: int, config: SMoRAConfig) -> int:
    """LoRA's r (d_in + d_out) plus the router's r d_in."""
    return config.rank * (2 * d_in + d_out)
