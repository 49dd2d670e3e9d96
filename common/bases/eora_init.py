"""EoRA as the LoRA's starting point on a quantized base (run config `base-init = "eora"`), on the server.

For every LoRA layer: E = W - deq(Q) (the quantization error of its base against the same layer of the
unquantized reference), C = Σ x xᵀ over the layer's inputs on the calibration data (every non-padding
token), then (B, A) = EoRA(E, C, r) (`common.bases.eora`), re-factored into FedSVD form (A with
orthonormal rows, the same product) and stored as LoRA's factors with B divided by the LoRA scaling s,
so that s B A is EoRA's compensation and the model starts close to the reference where the calibration
activations live. Per base (`calibration_reference`):
- "nf4": Q = NF4(W0), reference the fp32 model; served: deq(Q) + s B A.
- "qloram": Q = NF4(W0^P) on the pruned base, reference the pruned fp32 model (the same data-free masks);
  E is the NF4 error of the kept weights only. The served model is the full, unpruned W0, which has no
  NF4 error: adding the recovered s B A would add the compensation B0 A0 of an error W0 does not have. So
  the full model gets only the trained change s (B A - B0 A0), recovered to full shapes (`trained_change`
  then `common.bases.pruning.recover_arrays`); on the kept coordinates the full model is then
  W0 + s (B A - B0 A0), i.e. the pruned-fp32 model plus what training added, and W0 elsewhere.
- "lq_lora" (decision): Q stays LQ-LoRA's (data-free or Fisher-weighted), and EoRA replaces the low-rank
  part L1 L2 of the start by the activation-weighted optimum EoRA(W0 - Q, C) for that Q. Of the two
  readings this is the one that fits the rank: compensating the residual W0 - Q - L1 L2 on top of L1 L2
  would need rank 2r, while for a fixed Q, EoRA is the exact minimiser of tr((W0 - Q - L) C (...)ᵀ) over
  rank-r L, so its activation-weighted error is at most L1 L2's (a rank-r candidate). Q, hence the clients'
  base and its checksum, does not change; the clients never see the calibration data. Served: deq(Q) + s B A.
For "lq_lora" the inputs are those of the LQ-LoRA start (Q + L1 L2); for the others those of the quantized
model with B = 0, i.e. the activations the adapter will see.

Calibration data (decision): the server's public split (`public-examples` examples carved from the
data before partitioning, held by no client), so it costs no privacy budget; a private calibration set
is not offered. The server computes the factors once and sends them with the initial global state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.adapters.lora import LoRALinear
from common.bases.eora import eora_from_covariance
from common.bases.fedsvd_form import fedsvd_form
from common.tensors import trim


@torch.no_grad()
def input_covariances(model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device
                      ) -> dict[str, torch.Tensor]:
    """LoRA layer name -> Σ x xᵀ (float64, d_in x d_in) of its inputs over the non-padding tokens of `data`."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    sums = {name: torch.zeros(m.base.in_features, m.base.in_features, dtype=torch.float64, device=device)
            for name, m in layers.items()}
    mask: list[torch.Tensor] = []

    def hook(name):
        def record(_module, inputs):
            x = inputs[0]
            x = (x[mask[0]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])).double()  # padding tokens dropped
            sums[name] += x.T @ x
        return record

    was_training = model.training
    model.to(device).eval()
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for input_ids, attention_mask, _labels in DataLoader(data, batch_size=batch_size):
            input_ids, attention_mask = trim(input_ids, attention_mask)
            mask[:] = [attention_mask.to(device).bool()]
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums


@torch.no_grad()
def eora_initialise(model: nn.Module, reference: nn.Module, data: TensorDataset, batch_size: int,
                    device: torch.device) -> list[str]:
    """Set every LoRA layer of `model` (compressed base) to EoRA's compensation of its base's error against
    the same layer of `reference` (the full-precision model with the same adapters); return the layer names."""
    covariances = input_covariances(model, data, batch_size, device)
    for name, covariance in covariances.items():
        layer = model.get_submodule(name)
        full = reference.get_submodule(name).base.weight.detach().to(device)
        error = full.double() - layer.base.weight.detach().to(device).double()
        b, a = fedsvd_form(*eora_from_covariance(error.cpu(), covariance.cpu(), layer.lora_A.out_features))
        layer.lora_A.weight.copy_(a.to(layer.lora_A.weight))
        layer.lora_B.weight.copy_((b / layer.scaling).to(layer.lora_B.weight))
    return sorted(covariances)


def calibration_reference(config):
    """The run config of the unquantized model EoRA compensates towards: pruned fp32 for "qloram", else fp32."""
    return dataclasses.replace(config, base="loram" if config.base == "qloram" else "fp32", base_init="none",
                               lq_bits=0.0, lq_fisher="none")


def lora_factors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The LoRA factors of a global state (EoRA's start, B0 and A0, when taken from the initial one)."""
    return {key: value for key, value in state.items() if ".lora_A." in key or ".lora_B." in key}


def trained_change(state: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state` with every LoRA layer of `start` holding s (B A - B0 A0) instead of s B A: B' = [B, -B0] and
    A' = [A; A0], rank r + r0 (`common.adapters.rank_resize.fit_ranks` keeps the scaling s); other keys
    unchanged. What the full model of a "qloram" EoRA run gets (see the module docstring)."""
    changed = dict(state)
    for key, a0 in start.items():
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        changed[b_key] = np.concatenate([state[b_key], -start[b_key]], axis=1)
        changed[key] = np.concatenate([state[key], a0], axis=0)
    return changed
