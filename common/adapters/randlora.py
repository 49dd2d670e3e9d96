"""RandLoRA (Albert et al. 2025): a full-rank update from many frozen random low-rank bases.

Follows PEFT 0.21's `RandLoraLayer`, so an exported PEFT adapter gives the same logits. With
m = min(d_in, d_out), M = max(d_in, d_out) and N = ceil(m / r) bases:

  P = flatten_{(k, n)}(λ[k, n] A[k, :] γ[n, :])   (rN x m; one frozen unique basis A, r x m)
  Q = flatten_{(n, k)}(B[:, n, k])                 (M x Nr; N frozen bases B_n, M x r)
  ΔW = (alpha / r) Q P  on the m side, transposed when m = d_out < d_in.

(PEFT flattens P rank-major and Q basis-major; we pair the columns exactly as it does.) λ (r x N)
starts at 0, so ΔW = 0, and γ (N x m) at 1/M. rank(ΔW) reaches m; N r + N m values train per layer.
ΔW is bilinear in (λ, γ), so averaging them is not exact.

The bases come from the run seed alone (they cost no privacy and never travel), and are shared by
every layer as in PEFT: each entry is a function of (seed, basis index, position) only, drawn as
U(-√3, √3) (PEFT: Kaiming-uniform divided by its std, i.e. unit variance), so a smaller layer's bases
are a slice of a larger one's. PEFT builds one pair at the largest target shape and slices it per
layer; `fill_peft_bases` writes ours at that shape into a PEFT model saved with `save_projection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank, frozen_linear
from common.adapters.diagonal import DiagonalScale
from common.adapters.lora import seed_for


@dataclass(frozen=True)
class RandLoRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


def num_bases(d_out: int, d_in: int, rank: int) -> int:
    """N = ceil(min(d_in, d_out) / r): enough rank-r bases for a full-rank update."""
    return math.ceil(min(d_out, d_in) / rank)


def _unit_uniform(seed: int, count: int) -> torch.Tensor:
    """`count` draws of U(-√3, √3) (unit variance); a shorter draw is a prefix of a longer one."""
    u = torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return ((2 * u - 1) * math.sqrt(3)).float()


def unique_basis(seed: int, rank: int, m: int) -> torch.Tensor:
    """A (r x m), row k from its own stream: A for m' < m is A[:, :m']."""
    return torch.stack([_unit_uniform(seed_for(seed, f"randlora_A.{k}"), m) for k in range(rank)])


def random_bases(seed: int, rank: int, max_dim: int, n_bases: int) -> torch.Tensor:
    """B (M x N x r), basis n from its own stream (row-major M x r): smaller M, N give B[:M, :N]."""
    return torch.stack([_unit_uniform(seed_for(seed, f"randlora_B.{n}"), max_dim * rank).view(max_dim, rank)
                        for n in range(n_bases)], dim=1)


class RandLoRAGamma(nn.Module):
    """x -> x Gᵀ (or x G when `transposed`) with G[(k, n), j] = A[k, j] γ[n, j] (rN x m).

    A is frozen (a frozen Parameter, not a buffer); γ = `weight` (N x m) trains.
    """

    def __init__(self, basis: torch.Tensor, n_bases: int, max_dim: int, transposed: bool):
        super().__init__()
        self.basis = nn.Parameter(basis, requires_grad=False)  # r x m
        self.weight = nn.Parameter(torch.full((n_bases, basis.shape[1]), 1.0 / max_dim))
        self.transposed = transposed

    def matrix(self) -> torch.Tensor:
        return (self.basis[:, None, :] * self.weight[None]).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.matrix()
        return F.linear(x, g.T if self.transposed else g)


@register_grad_sampler(RandLoRAGamma)
def randlora_gamma_grad_sample(layer: RandLoRAGamma, activations: list[torch.Tensor], backprops: torch.Tensor
                               ) -> dict[nn.Parameter, torch.Tensor]:
    """d loss_b / d γ[n, j] = Σ_k A[k, j] (d loss_b / d G)[(k, n), j], via the per-example gradient of G."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    if layer.transposed:  # y = x G: dG = Σ_t x_tᵀ g_t
        g_grads = torch.einsum("b...i,b...j->bij", x, backprops)
    else:  # y = x Gᵀ: dG = Σ_t g_tᵀ x_t
        g_grads = torch.einsum("b...i,b...j->bij", backprops, x)
    r, (n, m) = layer.basis.shape[0], layer.weight.shape
    g_grads = g_grads.view(-1, r, n, m)
    return {layer.weight: torch.einsum("bknj,kj->bnj", g_grads, layer.basis.to(backprops.dtype))}


class RandLoRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: RandLoRAConfig, name: str):
        super().__init__(base)
        d_out, d_in, r = base.out_features, base.in_features, config.rank
        m, big = min(d_out, d_in), max(d_out, d_in)
        n = num_bases(d_out, d_in, r)
        self.scaling = config.scaling
        self.transposed = m != d_in  # PEFT puts γ on the input side whenever d_in = m
        q = random_bases(config.seed, r, big, n).flatten(1)  # M x Nr, basis-major as PEFT
        self.randlora_gamma = RandLoRAGamma(unique_basis(config.seed, r, m), n, big, self.transposed)
        self.randlora_lambda = DiagonalScale(r, n)  # λ on the rN axis, flattened (k, n) rank-major as PEFT
        self.frozen_B = frozen_linear(q.T if self.transposed else q, base)  # d_in -> Nr, or Nr -> d_out
        self.randlora_gamma.to(device=base.weight.device, dtype=base.weight.dtype)
        self.randlora_lambda.to(device=base.weight.device, dtype=base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        p = self.randlora_lambda.weight.flatten()[:, None] * self.randlora_gamma.matrix()  # rN x m
        q = self.frozen_B.weight.T if self.transposed else self.frozen_B.weight  # M x Nr
        delta = self.scaling * (q @ p)  # M x m
        return delta.T if self.transposed else delta

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return self.scaling * self.randlora_gamma(self.randlora_lambda(self.frozen_B(x)))
        return self.scaling * self.frozen_B(self.randlora_lambda(self.randlora_gamma(x)))


def randlora_trainable_count(d_out: int, d_in: int, config: RandLoRAConfig) -> int:
    """N r (λ) + N m (γ), N = ceil(m / r): about m + m²/r, growing as the rank shrinks."""
    n = num_bases(d_out, d_in, config.rank)
    return n * config.rank + n * min(d_out, d_in)


def randlora_peft_config(config, heads: list[str]):
    """PEFT's equivalent; it saves the bases (`save_projection`), which `fill_peft_bases` overwrites with ours."""
    from peft import RandLoraConfig

    return RandLoraConfig(r=config.rank, randlora_alpha=config.alpha, randlora_dropout=0.0,
                          target_modules=list(config.target_module_names), modules_to_save=heads,
                          projection_prng_key=config.seed, save_projection=True)


@torch.no_grad()
def fill_peft_bases(config, peft_model: nn.Module) -> None:
    """Write our seeded bases into a PEFT RandLoRA model's shared `randlora_A` (r x 1 x m) and
    `randlora_B` (M x N x r) buffers, at the largest target shape PEFT sized them for."""
    made: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    for name, buffer in peft_model.named_buffers(remove_duplicate=False):
        factor = name.split(".")[-2] if "." in name else ""
        if factor not in ("randlora_A", "randlora_B"):
            continue
        key = (factor, tuple(buffer.shape))
        if key not in made:
            if factor == "randlora_A":
                rank, _, m = buffer.shape
                made[key] = unique_basis(config.seed, rank, m)[:, None, :]
            else:
                big, n, rank = buffer.shape
                made[key] = random_bases(config.seed, rank, big, n)
        buffer.copy_(made[key])
