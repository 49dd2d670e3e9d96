"""GaLore (Zhao et al. 2024): Adam whose moments live in a low-rank projection of each matrix's gradient.

For a trainable matrix W (m x n) with gradient G, every `period` steps a projector is taken from the SVD
G = U Σ Vᵀ of the current gradient: P = U[:, :r] (m x r) when m <= n, else Q = V[:, :r] (n x r) on the
right. Adam's moments are kept for R = Pᵀ G (r x n) or R = G Q (m x r) only, and the update is projected
back: W <- W - lr · scale · P N (or N Qᵀ), N = Adam(R). Tensors that are not matrices, or whose smaller
side is <= r (the projection would be full rank), take the plain Adam step, exactly `torch.optim.Adam`'s; so
does the classifier head (a param group with `project = False`, `update_rules.py`), as in the reference code,
which projects the adapted matrices only: a rank-r head would move only r of its class directions a period.

Under DP-SGD, G here is the privatized gradient (clipped, noised: `common/training/pieces.py`), so the
SVD and the projection are post-processing and free; a projector from raw gradients would leak. The
per-sample gradients Opacus clips are still full (batch x m x n): GaLore saves optimizer state, not the
clipping's memory. Decisions (the card marks them "unsure"): moments are kept across projector refreshes
(as the reference code does); the optimizer, and so P, is fresh each round (fedlora's Adam state is too),
so P is the client's own, taken from its first private gradient of the round. On LoRA factors the client
sends its trained tensors as usual; on full weights (adapter `full`) it sends each matrix's round change as
two thin factors, exact because the change lies in the projectors' span (`common/low_rank_upload.py`).
`galore-projection = "dct"` takes P from the fixed DCT basis instead of an SVD (`dct.py`, card 29).
"""

from __future__ import annotations

import math

import torch

from common.training.dct import dct_projector


def galore_projector(grad: torch.Tensor, rank: int) -> tuple[torch.Tensor, str]:
    """(P, "left") with P = U[:, :r] when m <= n, else (Q, "right") with Q = V[:, :r]: orthonormal columns."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    if grad.shape[0] <= grad.shape[1]:
        return u[:, :rank].to(grad.dtype), "left"
    return vh[:rank].T.to(grad.dtype), "right"


# run config `galore-projection` -> (private gradient, rank) -> (P, side); GaLore and FRUGAL (`frugal.py`)
PROJECTIONS = {"svd": galore_projector, "dct": dct_projector}


def project(grad: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    """R = Pᵀ G (left) or G Q (right)."""
    return projector.T @ grad if side == "left" else grad @ projector


def project_back(low: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    """P N (left) or N Qᵀ (right): back to W's shape, in the span of the projector."""
    return projector @ low if side == "left" else low @ projector.T


class GaLoreAdam(torch.optim.Optimizer):
    """Adam (torch's formulas, no weight decay) with GaLore's projection on matrices larger than `rank`."""

    def __init__(self, params, lr: float, rank: int, period: int, scale: float, projection: str = "svd",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, rank=rank, period=period, scale=scale, betas=betas, eps=eps))
        self.make_projector = PROJECTIONS[projection]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                projected = p.ndim == 2 and group["rank"] < min(p.shape) and group.get("project", True)
                if not state:
                    state["step"] = 0
                if projected and state["step"] % group["period"] == 0:
                    state["projector"], state["side"] = self.make_projector(p.grad, group["rank"])
                grad = project(p.grad, state["projector"], state["side"]) if projected else p.grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, state["step"],
                                           beta1, beta2, group["eps"])
                if projected:
                    p.add_(project_back(direction, state["projector"], state["side"]),
                           alpha=-group["lr"] * group["scale"])
                else:
                    p.add_(direction, alpha=-group["lr"])


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, step: int,
                   beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """Update the moments in place; return m̂ / (sqrt(v̂) + eps) as `torch.optim.Adam` computes it."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    return exp_avg / bias1 / (exp_avg_sq.sqrt() / math.sqrt(bias2) + eps)
