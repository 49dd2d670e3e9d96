"""SLTrain (Han et al. 2024) as an adapter: LoRA plus a sparse matrix on a fixed random support.

  W = W0 + s B A + S,   s = alpha / r,   S zero off a support Ω of round(δ d_out d_in) positions.

Ω is drawn uniformly without replacement from a generator seeded by (run seed, layer name), so every
party rebuilds it: the support travels as a seed, never as indices, and only the |Ω| values of S train
and are sent. The same Ω everywhere makes averaging the values exactly averaging the clients' S; B A
averages as LoRA's factors do (inexactly), so the adapter as a whole is declared inexact. Under FFA-LoRA
(A frozen from the seed, B and S trained) the whole update is linear in what travels, and exact.

DP: the per-example gradient of the value at (i, j) is Σ_t g_t[i] x_t[j] (g the gradient at the layer
output). `support_gradient` computes it one of two ways, both exact, memory bounded by `DENSE_ELEMENTS`:
for a layer of at most that many entries, the dense per-example gradients gᵀx of a few examples at a time
(one batched matmul, `DENSE_ELEMENTS` floats at most) read at Ω; for larger layers, the rows of g and
columns of x gathered in chunks of Ω (memory batch x |Ω| plus one chunk). The matmul is ~35x faster at
SaRA's 10 % of a 384 x 384 layer (42 ms vs 1.58 s for 32 examples of 64 tokens, one core): gathers of
batch x tokens x |Ω| elements cost more than the whole product. The forward builds the dense S once per
batch (like W0, not per example) and applies it with one matmul.

Decisions (the card marks them "unsure"): δ is run config `sltrain-density`, default 0.03 (the issue's;
the paper's experiments use a few percent); at least one position per layer. S starts at 0 and B at 0
with LoRA's seeded A, so training starts at W0 (the paper, which pretrains from scratch, initializes S
and both factors randomly); s scales B A only, S is unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank
from common.adapters.lora import seed_for, seeded_lora_pair

CHUNK_ELEMENTS = 2**22  # one gathered block of the per-sample gradient: batch x tokens x chunk of Ω
DENSE_ELEMENTS = 2**24  # dense per-example gradients held at once (64 MiB float32); larger layers gather


@dataclass(frozen=True)
class SLTrainConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    density: float = 0.03
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42


def support_size(d_out: int, d_in: int, density: float) -> int:
    """|Ω| = round(δ d_out d_in), at least 1."""
    return max(1, round(density * d_out * d_in))


def sparse_support(d_out: int, d_in: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of Ω: `support_size` positions drawn without replacement from `seed`, in row-major order."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=generator)[: support_size(d_out, d_in, density)].sort().values
    return flat // d_in, flat % d_in


def support_gradient(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     chunk_elements: int = CHUNK_ELEMENTS, dense_elements: int = DENSE_ELEMENTS) -> torch.Tensor:
    """[n, k] = Σ_t g[n, t, rows_k] x[n, t, cols_k] for g (n x T x d_out), x (n x T x d_in)."""
    d_out, d_in = g.shape[-1], x.shape[-1]
    if d_out * d_in <= dense_elements:  # a few examples' dense gᵀx at a time, read at Ω
        flat = rows * d_in + cols
        per = max(1, dense_elements // (d_out * d_in))
        return torch.cat([torch.bmm(g[i:i + per].transpose(1, 2), x[i:i + per]).reshape(-1, d_out * d_in)[:, flat]
                          for i in range(0, g.shape[0], per)])
    step = max(1, chunk_elements // max(1, g.shape[0] * g.shape[1]))
    parts = [torch.einsum("ntk,ntk->nk", g[:, :, rows[k : k + step]], x[:, :, cols[k : k + step]])
             for k in range(0, len(rows), step)]
    return torch.cat(parts, dim=1)


class SparseValues(nn.Module):
    """y = S x, S (d_out x d_in) zero off the support (rows, cols) and `weight` (|Ω|) on it."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(len(rows)))
        # Plain attributes, not buffers (Opacus refuses buffers beside trainable parameters); they are
        # rebuilt from the seed, never saved or sent.
        self.rows, self.cols = rows, cols
        self.dense_shape = (d_out, d_in)

    def support(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows.device != device:
            self.rows, self.cols = self.rows.to(device), self.cols.to(device)
        return self.rows, self.cols

    def dense(self) -> torch.Tensor:
        return self.weight.new_zeros(self.dense_shape).index_put(self.support(self.weight.device), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense())


@register_grad_sampler(SparseValues)
def sparse_values_grad_sample(layer: SparseValues, activations: list[torch.Tensor], backprops: torch.Tensor
                              ) -> dict[nn.Parameter, torch.Tensor]:
    """The values' per-example gradients, gathered on Ω (see `support_gradient`)."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    rows, cols = layer.support(x.device)
    return {layer.weight: support_gradient(backprops.reshape(n, -1, backprops.shape[-1]),
                                           x.reshape(n, -1, x.shape[-1]), rows, cols)}


class SLTrainLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: SLTrainConfig, name: str):
        super().__init__(base)
        d_out, d_in = base.out_features, base.in_features
        self.scaling = config.scaling
        self.lora_A, self.lora_B = seeded_lora_pair(base, config.rank, seed_for(config.seed, name))
        rows, cols = sparse_support(d_out, d_in, config.density, seed_for(config.seed, name + "/sltrain-support"))
        self.sltrain_S = SparseValues(rows, cols, d_out, d_in).to(device=base.weight.device, dtype=base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B.weight @ self.lora_A.weight + self.sltrain_S.dense()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.lora_B(self.lora_A(x)) + self.sltrain_S(x)


def sltrain_trainable_count(d_out: int, d_in: int, config: SLTrainConfig) -> int:
    """LoRA's r (d_in + d_out) plus the |Ω| sparse values."""
    return config.rank * (d_in + d_out) + support_size(d_out, d_in, config.density)
