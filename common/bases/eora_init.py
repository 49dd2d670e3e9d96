"""EoRA as the LoRA's starting point on the NF4 base (run config `base-init = "eora"`), on the server.

For every LoRA layer: E = W0 - deq(Q(W0)) (the NF4 error of its base), C = Σ x xᵀ over the layer's inputs
on the calibration data (every non-padding token), then (B, A) = EoRA(E, C, r) (`common.bases.eora`),
re-factored into FedSVD form (A with orthonormal rows, the same product) and stored as LoRA's factors
with B divided by the LoRA scaling s, so that s B A is EoRA's compensation and the model starts close to
the full-precision one where the calibration activations live.

Calibration data (decision): the server's public split (`public-examples` examples carved from the
data before partitioning, held by no client), so it costs no privacy budget; a private calibration set
is not offered. The inputs are those of the NF4 model itself (with the adapter still at B = 0), i.e. the
activations the adapter will see when served. The server computes the factors once and sends them with
the initial global state; the clients' bases do not depend on them (the base checksum is unchanged).
"""

from __future__ import annotations

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
