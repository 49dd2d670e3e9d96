"""SALT (Elsayed et al. 2025): scale and shift the top-r singular values of W0, plus a LoRA for the rest.

W0 = U Σ Vᵀ (thin SVD). The top r singular values get a trainable scale a (init 1) and shift b (init 0),
σ'_i = ReLU(a_i σ_i + b_i); the other singular values stay. A LoRA B A (rank r_l = `salt-lora-rank`,
scaled by s = alpha / r_l) adapts the rest:

    ΔW = U_r diag(ReLU(a σ + b) − σ) V_rᵀ + s (I − U_r U_rᵀ) B A (I − V_r V_rᵀ).

Decisions, and why:
- Subspace of the LoRA part: the complement of the top-r singular subspaces, not a plain additive B A.
  The paper's abstract and README say "a low-rank update for the remaining subspace", and the SALT layer
  the official SAM code imports adds X Y to the trailing (R−r) x (R−r) block of Σ (R = min(d_in, d_out)),
  i.e. U_{r:R} X Y V_{r:R}ᵀ. (An earlier file in the same code base adds a plain X Y; we follow the
  one in use.) We keep the paper's function class but write the factors in the layer's own coordinates,
  B (d_out x r_l) and A (r_l x d_in), projected by the fixed I − U_r U_rᵀ and I − V_r V_rᵀ: for a square
  layer this is exactly the rank-≤r_l updates of the remaining block; for a rectangular one it also
  reaches W0's null space. So the top-r directions change only through (a, b), the LoRA part never
  rotates them, and the trainable count is 2r + r_l (d_in + d_out). The projections reuse V_rᵀ x, which
  the (a, b) path computes anyway: only U_r and V_r are stored, never U_⊥, V_⊥ or a dense W.
- Init: the public code draws X, Y ~ N(0, 0.01²), so W ≠ W0 at init. Here B = 0 (as in LoRA) and
  A ~ Kaiming-uniform from a generator seeded by (seed, module name), drawn exactly as `lora.py` draws
  LoRA's A; with a = 1 and b = 0 (ReLU(σ) − σ = 0 as σ ≥ 0), W == W0 exactly at init.
- Not kept from the public code: its regularizer ‖1 − a‖ + ‖b‖ + ‖X‖ ‖Y‖ (our training loop has no
  adapter penalty; DP does not need it), and its elementwise ReLU over the whole LoRA-shifted Σ block
  (which also clips off-diagonal entries of X Y); the ReLU applies to the r scaled singular values only.
  `lora-dropout` is not applied.
- Factor names: `salt_scale` (a) and `salt_shift` (b), and `lora_A` / `lora_B` for the LoRA part, so
  the LoRA strategies act on the LoRA part the way they do on plain LoRA: FFA-LoRA keeps A at its seeded
  init (every party rebuilds it) and trains a, b, B, for which averaging B is exact for the LoRA part;
  FedSVD freezes A for the round and re-factors the averaged B A as B' A' with B' A' = B A. The
  projections sit outside B A, so that refactoring leaves ΔW unchanged, and ‖A' (I − V_r V_rᵀ) x‖ ≤ ‖x‖
  still bounds B's per-sample gradients. Both strategies average a and b as plain tensors.
- Federated: averaging (a, b) is exact while no ReLU clips (ΔW is then linear in them); the LoRA part
  is bilinear, so the adapter is declared inexact.
- DP: the forward stays factored (x → V_rᵀ x → per-coordinate scale → U_r), and (a, b) get exact
  per-sample gradients from their own Opacus grad samplers. With h = V_rᵀ x, g the gradient at the
  diagonal's output, q_i = Σ_t g_ti h_ti and m_i = 1[a_i σ_i + b_i > 0]: ∂a_i = q_i σ_i m_i, ∂b_i = q_i m_i.
  The layer computes ReLU(aσ + b) h as m ⊙ (a σ h + b h) with the mask m held constant: the same value,
  and the same gradient almost everywhere (ReLU's derivative is the mask; both give 0 at exactly 0), so
  each of a and b sits in its own diagonal module whose sampler only sees the masked backprop.
U_r, σ_r, V_r come from the float64 CPU SVD of `truncated_svd` with canonical signs, so every party
rebuilds the same frozen factors from the shared base model; σ is a frozen parameter (Opacus: a module
with a trainable parameter must not own buffers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.adapters.base import AdapterLayer, frozen_linear
from common.adapters.decompositions import truncated_svd
from common.adapters.diagonal import DiagonalScale
from common.adapters.lora import seed_for
from common.errors import ConfigError


@dataclass(frozen=True)
class SALTConfig:
    rank: int = 8  # top singular values scaled and shifted
    lora_rank: int = 8  # rank of the LoRA on the remaining subspace
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42

    @property
    def scaling(self) -> float:
        """s = alpha / lora_rank, the LoRA part's scale (as in `lora.py`)."""
        return self.alpha / self.lora_rank


class SingularValueScale(nn.Module):
    """y = x * (a σ): a trainable scale a (init 1) of frozen singular values σ (a frozen Parameter)."""

    def __init__(self, singular_values: torch.Tensor):
        super().__init__()
        self.singular_values = nn.Parameter(singular_values.clone(), requires_grad=False)
        self.weight = nn.Parameter(torch.ones_like(singular_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.weight * self.singular_values)


@register_grad_sampler(SingularValueScale)
def singular_value_scale_grad_sample(layer: SingularValueScale, activations: list[torch.Tensor],
                                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """d loss_n / d a_i = σ_i * sum over the example's positions of x_i * (d loss_n / d y_i)."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    return {layer.weight: torch.einsum("n...i,n...i->ni", x, backprops) * layer.singular_values}


class SALTLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: SALTConfig, name: str):
        super().__init__(base)
        d_out, d_in = base.out_features, base.in_features
        if config.lora_rank > min(d_in, d_out):
            raise ConfigError(
                f"salt-lora-rank = {config.lora_rank} exceeds layer {name} ({d_out} x {d_in}); "
                f"use salt-lora-rank <= {min(d_in, d_out)}"
            )
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        u, s, vh = truncated_svd(base.weight.detach(), config.rank)
        self.scaling = config.scaling
        self.frozen_right = frozen_linear(vh, base)  # V_rᵀ: r x d_in
        self.salt_scale = SingularValueScale(s).to(**like)  # a, with σ_r
        self.salt_shift = DiagonalScale(config.rank).to(**like)  # b
        self.frozen_left = frozen_linear(u, base)  # U_r: d_out x r
        self.lora_A = nn.Linear(d_in, config.lora_rank, bias=False).to(**like)
        self.lora_B = nn.Linear(config.lora_rank, d_out, bias=False).to(**like)
        self.reset_lora(seed_for(config.seed, name))

    def reset_lora(self, seed: int) -> None:
        """A ~ Kaiming-uniform from a named seed, drawn as `LoRALinear` draws it; B = 0."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.base.in_features)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator))
            self.lora_B.weight.zero_()

    def singular_value_change(self) -> torch.Tensor:
        """ReLU(a σ + b) − σ, the change of the top-r singular values (r)."""
        sigma = self.salt_scale.singular_values
        return torch.relu(self.salt_scale.weight * sigma + self.salt_shift.weight) - sigma

    def delta_weight(self) -> torch.Tensor:
        u, vh = self.frozen_left.weight, self.frozen_right.weight
        top = (u * self.singular_value_change()) @ vh
        lora = self.lora_B.weight @ self.lora_A.weight
        lora = lora - u @ (u.T @ lora)
        lora = lora - (lora @ vh.T) @ vh
        return top + self.scaling * lora

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frozen_right(x)  # V_rᵀ x
        sigma = self.salt_scale.singular_values
        with torch.no_grad():  # the ReLU's mask: piecewise constant in (a, b)
            active = (self.salt_scale.weight * sigma + self.salt_shift.weight > 0).to(h.dtype)
        top = active * (self.salt_scale(h) + self.salt_shift(h)) - sigma * h  # (ReLU(aσ + b) − σ) ⊙ h
        lora = self.scaling * self.lora_B(self.lora_A(x - h @ self.frozen_right.weight))  # s B A (I − V_r V_rᵀ) x
        return self.frozen_left(top - lora @ self.frozen_left.weight) + lora  # U_r top + (I − U_r U_rᵀ) lora


def salt_trainable_count(d_out: int, d_in: int, config: SALTConfig) -> int:
    """2r (scale and shift) + r_l (d_in + d_out) (the LoRA's A and B)."""
    return 2 * config.rank + config.lora_rank * (d_in + d_out)
