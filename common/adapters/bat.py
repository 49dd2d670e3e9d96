"""Bat (Bone's "weight guide" variant, PEFT 0.21 `MissConfig(init_weights="bat")`): block updates through W0.

W0 is cut into r x r blocks W0_ij (row block i, column block j); each row block i has one trainable
b_i (r x r), zero at start, and

  ΔW_ij = W0_ij b_i + b_i = (W0_ij + I) b_i,

so the update is guided by the frozen weights. PEFT's math exactly (its export gives our logits); no
α/r scaling. (d_out / r) r² = r d_out values train per layer, as for Bone, but rank(ΔW) is not bounded
by r. W0 is fixed, so ΔW is linear in b and averaging the clients' b is exactly averaging their ΔW.

The forward materializes W0 + ΔW, as PEFT does. W0 is not stored by the trained module (it has no
buffers and no copy of W0): the layer passes the base weight in, `miss_block(W0, x)`, so Opacus keeps
it with the activations and the grad sampler reads it there. The per-example gradient goes through
the per-example gradient of ΔW (d_out x d_in per example, as Opacus' own for a full `nn.Linear`).
ΔW depends on W0, so while merged the merged update is remembered and unmerge subtracts it (PEFT
instead inverts (I + b_i)); the stashed tensor is not state and is dropped on unmerge.

Decision: PEFT requires r to divide d_in and d_out; we zero-pad W0 to multiples of r and cut ΔW back,
which is PEFT's math wherever PEFT accepts the layer (every MiniLM layer at ranks 1, 2, 4, 8, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.adapters.base import AdapterLayer, RemembersMergedDelta


@dataclass(frozen=True)
class BatConfig:
    rank: int = 8
    target_modules: tuple[str, ...] = ("query", "value")


def padded_blocks(w0: torch.Tensor, r: int) -> torch.Tensor:
    """W0 zero-padded to multiples of r and viewed as blocks [i, p, j, k] = W0[i r + p, j r + k]."""
    d_out, d_in = w0.shape
    w0 = F.pad(w0, (0, (-d_in) % r, 0, (-d_out) % r))
    return w0.reshape(w0.shape[0] // r, r, w0.shape[1] // r, r)


def bat_delta(w0: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW with ΔW_ij = W0_ij b_i + b_i, for b (row blocks x r x r), cut to W0's shape."""
    blocks = padded_blocks(w0.to(b.dtype), b.shape[-1])
    delta = torch.einsum("ipjk,ikq->ipjq", blocks, b) + b[:, :, None, :]
    return delta.flatten(2).flatten(0, 1)[: w0.shape[0], : w0.shape[1]]


class BatBlock(nn.Module):
    """y = x ΔWᵀ with ΔW = `bat_delta(w0, weight)`; W0 comes in as the first input, x as the last."""

    def __init__(self, rank: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(math.ceil(d_out / rank), rank, rank))

    def forward(self, w0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, bat_delta(w0, self.weight))


@register_grad_sampler(BatBlock)
def bat_block_grad_sample(layer: BatBlock, activations: list[torch.Tensor], backprops: torch.Tensor
                          ) -> dict[nn.Parameter, torch.Tensor]:
    """d loss_n / d b_i[k, q] = Σ_j Σ_p (W0_ij + I)[p, k] G_n,ij[p, q], G_n = Σ_t g_t x_tᵀ the example's ΔW gradient.

    (Opacus keeps every input; the batch size comes from the last one, x.)
    """
    if not layer.weight.requires_grad:
        return {}
    w0, x = activations[0].to(backprops.dtype), activations[-1].to(backprops.dtype)
    r = layer.weight.shape[-1]
    grads = torch.einsum("n...o,n...i->noi", backprops, x)
    d_out, d_in = grads.shape[1:]
    grads = F.pad(grads, (0, (-d_in) % r, 0, (-d_out) % r))
    grads = grads.reshape(grads.shape[0], grads.shape[1] // r, r, grads.shape[2] // r, r)  # [n, i, p, j, q]
    through_w0 = torch.einsum("nipjq,ipjk->nikq", grads, padded_blocks(w0, r))
    return {layer.weight: through_w0 + grads.sum(dim=3)}


class BatLinear(RemembersMergedDelta, AdapterLayer):
    def __init__(self, base: nn.Linear, config: BatConfig, name: str):
        super().__init__(base)
        self.miss_block = BatBlock(config.rank, base.out_features)
        self.miss_block.to(device=base.weight.device, dtype=base.weight.dtype)
        self._merged_delta: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        if self._merged_delta is not None:
            return self._merged_delta
        return bat_delta(self.base.weight, self.miss_block.weight)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.miss_block(self.base.weight, x)


def bat_trainable_count(d_out: int, d_in: int, config: BatConfig) -> int:
    """ceil(d_out / r) r²: one r x r block per row block (r d_out where r divides d_out)."""
    return math.ceil(d_out / config.rank) * config.rank ** 2


def bat_peft_config(config, heads: list[str]):
    """PEFT 0.21's MiSS in its "bat" variant."""
    from peft import MissConfig

    return MissConfig(r=config.rank, miss_dropout=0.0, init_weights="bat",
                      target_modules=list(config.target_module_names), modules_to_save=heads, bias="none")
