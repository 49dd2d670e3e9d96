"""The diagonal empirical Fisher of frozen linear weights on public data (LQ-LoRA's data-aware variant).

F[i, j] = (1/N) Σ_n (∂ℓ_n / ∂W[i, j])², with ℓ_n the cross-entropy of example n under the model as built
(the pretrained weights, the new seeded head, every LoRA at B = 0). The per-example gradient of a linear
layer is Σ_t g_{n,t} x_{n,t}ᵀ (its backpropagated output gradients times its inputs, summed over the
tokens; padding tokens have g = 0), so one forward and backward per batch gives all N squares, as Opacus's
grad sampler for `nn.Linear` does.

Decisions:
- Data: only the server's public split (`lq-fisher = "public"`), public text held by no client's partition.
  Every party recomputes the same Fisher from it (it is public, no privacy cost), because Q depends on it and
  each party builds its own base (`common.bases.registry`). A Fisher on the clients' private data would need
  their DP gradients, charged to their budgets: not offered (`lq-fisher = "private"` is refused).
- Precision: float64 on the CPU, so that the parties get the same Q up to float64 rounding (the base
  checksum must match across processes; a float32 Fisher could flip NF4 codes between thread layouts).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.tensors import trim


def diagonal_fisher(model: nn.Module, names: list[str], data: TensorDataset, batch_size: int = 16
                    ) -> dict[str, torch.Tensor]:
    """{name: F (float64, d_out x d_in)} for the `nn.Linear` modules `names` of `model` (not modified)."""
    work = copy.deepcopy(model).double().cpu().eval()
    work.requires_grad_(False)
    squares: dict[str, torch.Tensor] = {}
    handles = []

    def record(name):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach()

            def backward_hook(g):
                if g.dim() == 2:  # one vector per example (e.g. the pooler)
                    per_example = g[:, :, None] * x[:, None, :]
                else:  # batch x tokens x features: Σ_t g_t x_tᵀ per example, a batched matmul
                    per_example = torch.einsum("bto,bti->boi", g, x)
                squares[name] = squares.get(name, 0) + per_example.square().sum(dim=0)
            output.register_hook(backward_hook)
        return forward_hook

    for name in names:
        linear = work.get_submodule(name)
        linear.weight.requires_grad_(True)  # so that the outputs carry a gradient to hook
        handles.append(linear.register_forward_hook(record(name)))
    try:
        for input_ids, attention_mask, labels in DataLoader(data, batch_size=batch_size):
            input_ids, attention_mask = trim(input_ids, attention_mask)
            logits = work(input_ids=input_ids, attention_mask=attention_mask).logits
            F.cross_entropy(logits, labels, reduction="sum").backward()  # sum: each example's own gradient
    finally:
        for handle in handles:
            handle.remove()
    return {name: squares[name] / len(data) for name in names}
