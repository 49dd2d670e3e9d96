"""FRUGAL (Zmushko et al. 2024, card 47): Adam in a small subspace of each matrix's gradient, state-free
signSGD on the rest, so every direction moves but only the subspace holds optimizer state.

For a trainable matrix W (m x n) with private gradient G, a projector P of rank r = round(ρ min(m, n))
(`frugal-density` ρ; GaLore's SVD of G or the DCT basis, `galore-projection`) splits G exactly:

  G_s = Pᵀ G (r x n; G Q on the right when m > n),   G_f = G − P G_s,   P G_s + G_f = G,
  W <- W − lr · P Adam(G_s) − lr · κ · sign(G_f)        (κ = `frugal-sign-lr-scale`).

P is refreshed from the private gradient every `frugal-period` steps. At r = min(m, n) the subspace is the
whole space and W takes exactly torch's Adam step (no rotation); at r = 0 it is pure signSGD. Tensors that
are not matrices always take Adam (the paper keeps its norms and other non-projected tensors state-full).

Under DP-SGD, G is the privatized gradient (`pieces.py`), so the projector, the split and the sign are
post-processing and free; the sign of a noisy residual is legitimate but noisy. Decisions (the card marks
them "unsure"): Adam's moments and its bias correction restart at every refresh (the reference's
`reset_statistics=True`, since the new subspace has other coordinates); κ defaults to 0.1, the reference's
fine-tuning setting; every matrix is split, the classifier head included (the paper's language-model head
stays state-full; ours is classes x hidden, small either way). The optimizer is fresh each round, like
fedlora's Adam.
"""

from __future__ import annotations

import math

import torch

from common.training.galore import PROJECTIONS, adam_direction, project, project_back


def frugal_rank(shape: torch.Size, density: float) -> int:
    """r = round(ρ · min(m, n)), between 0 and min(m, n)."""
    side = min(shape)
    return max(0, min(side, math.floor(density * side + 0.5)))


def frugal_split(grad: torch.Tensor, projector: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_s, G_f): the subspace coordinates Pᵀ G (or G Q) and the residual G − P Pᵀ G (or G − G Q Qᵀ)."""
    low = project(grad, projector, side)
    return low, grad - project_back(low, projector, side)


class FrugalAdam(torch.optim.Optimizer):
    """Adam (torch's formulas, no weight decay) on a rank-r subspace of each matrix, signSGD on the rest."""

    def __init__(self, params, lr: float, density: float, period: int, sign_lr_scale: float,
                 projection: str = "svd", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, density=density, period=period, sign_lr_scale=sign_lr_scale,
                                      betas=betas, eps=eps))
        self.make_projector = PROJECTIONS[projection]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rank = frugal_rank(p.shape, group["density"]) if p.ndim == 2 and group.get("project", True) else None
                if rank is None or rank == min(p.shape):
                    p.add_(self._adam(self.state[p], p.grad, group), alpha=-group["lr"])
                elif rank == 0:
                    p.add_(p.grad.sign(), alpha=-group["lr"] * group["sign_lr_scale"])
                else:
                    self._split_step(p, rank, group)

    def _split_step(self, p: torch.nn.Parameter, rank: int, group: dict) -> None:
        state = self.state[p]
        if "projector" not in state or state["step"] == group["period"]:
            state.clear()  # a new subspace: its moments start from zero
            state["projector"], state["side"] = self.make_projector(p.grad, rank)
        low, residual = frugal_split(p.grad, state["projector"], state["side"])
        direction = self._adam(state, low, group)
        p.add_(project_back(direction, state["projector"], state["side"]), alpha=-group["lr"])
        p.add_(residual.sign(), alpha=-group["lr"] * group["sign_lr_scale"])

    @staticmethod
    def _adam(state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        return adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, state["step"], beta1, beta2, group["eps"])
