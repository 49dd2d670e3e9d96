"""LoRAM ("Train Small, Infer Large", Zhang et al. 2025, card 15): train LoRA on a structurally pruned base,
then recover the adapter to full size and use it with the unpruned model.

Structured pruning removes whole MLP channels (intermediate neurons) and attention heads. Recovery is
B = E_out B^P and A = A^P E_inᵀ with 0/1 selection matrices E, i.e. B^P's rows go to the kept output
positions and A^P's columns to the kept input positions, zeros elsewhere. Then
(W + s B A)[kept_out][:, kept_in] = W^P + s B^P A^P and W is untouched at pruned coordinates.

Importance score (decision): the paper prunes with LLM-Pruner's gradient-based scores on public
calibration text; we use a data-free score, the L2 norm of every weight (and bias) that touches the
channel or head. It reads no data, so it costs no privacy budget and every party can recompute the
same masks from the public base weights. Calibrating pruning on private activations is not offered.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

IndexMap = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"prune ratio = {ratio!r} is invalid: give the fraction of MLP channels and attention "
                         f"heads to remove, strictly between 0 and 1 (e.g. 0.5)")


def kept_count(total: int, ratio: float) -> int:
    """How many of `total` units survive pruning `ratio` of them (at least one)."""
    check_ratio(ratio)
    return max(1, round((1.0 - ratio) * total))


def select_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices of the `keep` highest scores (ties go to the lower index)."""
    order = torch.sort(-scores.detach(), stable=True).indices[:keep]
    return torch.sort(order).values


def _row_squares(layer: nn.Linear) -> torch.Tensor:
    """Σ_j W[i, j]² + b[i]² for every output row i (float64)."""
    squares = layer.weight.detach().double().square().sum(dim=1)
    return squares if layer.bias is None else squares + layer.bias.detach().double().square()


def _column_squares(layer: nn.Linear) -> torch.Tensor:
    return layer.weight.detach().double().square().sum(dim=0)


def channel_importance(up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """Per intermediate channel j: sqrt(‖up.W[j, :]‖² + up.b[j]² + ‖down.W[:, j]‖²)."""
    return (_row_squares(up) + _column_squares(down)).sqrt()


def head_importance(query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear, num_heads: int
                    ) -> torch.Tensor:
    """Per head: the L2 norm of its q/k/v rows (with biases) and of its columns of the output projection."""
    per_row = _row_squares(query) + _row_squares(key) + _row_squares(value) + _column_squares(output)
    return per_row.reshape(num_heads, -1).sum(dim=1).sqrt()


def head_rows(kept_heads: torch.Tensor, head_size: int) -> torch.Tensor:
    """The q/k/v output rows (and output-projection input columns) that belong to the kept heads."""
    return (kept_heads[:, None] * head_size + torch.arange(head_size)).reshape(-1)


def prune_linear(layer: nn.Linear, kept_out: torch.Tensor | None = None, kept_in: torch.Tensor | None = None
                 ) -> nn.Linear:
    """A new `nn.Linear` with W[kept_out][:, kept_in] and b[kept_out] (None keeps every row / column)."""
    weight = layer.weight.detach()
    if kept_out is not None:
        weight = weight[kept_out]
    if kept_in is not None:
        weight = weight[:, kept_in]
    pruned = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    pruned.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        pruned.weight.copy_(weight)
        if layer.bias is not None:
            pruned.bias.copy_(layer.bias.detach() if kept_out is None else layer.bias.detach()[kept_out])
    pruned.requires_grad_(layer.weight.requires_grad)
    return pruned


def select_lora(b: torch.Tensor, a: torch.Tensor, kept_out: torch.Tensor | None, kept_in: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B^P, A^P) = (E_outᵀ B, A E_in): the rows and columns of a full-size adapter on the pruned base."""
    return (b if kept_out is None else b[kept_out]), (a if kept_in is None else a[:, kept_in])


def recover_lora(b_p: torch.Tensor, a_p: torch.Tensor, kept_out: torch.Tensor | None,
                 kept_in: torch.Tensor | None, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (E_out B^P, A^P E_inᵀ): full-shape factors, zero at pruned rows of B and columns of A."""
    b = b_p.new_zeros(d_out, b_p.shape[1])
    a = a_p.new_zeros(a_p.shape[0], d_in)
    b[slice(None) if kept_out is None else kept_out] = b_p
    a[:, slice(None) if kept_in is None else kept_in] = a_p
    return b, a


def bert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BERT-style transformer layer (has attention.self.query and intermediate.dense)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "attention") and hasattr(m, "intermediate") and hasattr(m.attention, "self")]


@dataclass
class PrunedModel:
    """The pruned copy plus, per pruned `nn.Linear` (dotted name), its kept output rows and input columns."""

    model: nn.Module
    index_maps: IndexMap


def prune_bert(model: nn.Module, ratio: float) -> PrunedModel:
    """Remove `ratio` of the MLP channels and of the attention heads of every BERT layer (the model is copied).

    Per layer: the channels with the lowest `channel_importance` lose their `intermediate.dense` rows and
    `output.dense` columns; the heads with the lowest `head_importance` lose their query/key/value rows and
    their `attention.output.dense` columns. Hidden size, embeddings and head are unchanged.
    """
    kept_count(1, ratio)
    pruned = copy.deepcopy(model)
    maps: IndexMap = {}
    for name, layer in bert_layers(pruned):
        attention, self_attention = layer.attention, layer.attention.self
        up, down = layer.intermediate.dense, layer.output.dense
        channels = select_kept(channel_importance(up, down), kept_count(up.out_features, ratio))
        layer.intermediate.dense = prune_linear(up, kept_out=channels)
        layer.output.dense = prune_linear(down, kept_in=channels)
        maps[f"{name}.intermediate.dense"] = (channels, None)
        maps[f"{name}.output.dense"] = (None, channels)

        heads = self_attention.num_attention_heads
        size = self_attention.attention_head_size
        scores = head_importance(self_attention.query, self_attention.key, self_attention.value,
                                 attention.output.dense, heads)
        rows = head_rows(select_kept(scores, kept_count(heads, ratio)), size)
        for projection in ("query", "key", "value"):
            setattr(self_attention, projection, prune_linear(getattr(self_attention, projection), kept_out=rows))
            maps[f"{name}.attention.self.{projection}"] = (rows, None)
        attention.output.dense = prune_linear(attention.output.dense, kept_in=rows)
        maps[f"{name}.attention.output.dense"] = (None, rows)
        self_attention.num_attention_heads = rows.numel() // size
        self_attention.all_head_size = rows.numel()
    return PrunedModel(pruned, maps)


def recover_arrays(arrays: dict[str, np.ndarray], index_maps: IndexMap, full_shapes: dict[str, tuple[int, ...]]
                   ) -> dict[str, np.ndarray]:
    """A pruned-space global state as the full model's state: every LoRA factor of a pruned layer recovered.

    `lora_B` of layer m becomes E_out B^P (zero rows at m's pruned outputs), `lora_A` becomes A^P E_inᵀ (zero
    columns at its pruned inputs); every other tensor (the head, factors of unpruned layers) is unchanged.
    `full_shapes` gives each key's shape in the full model (its rank may differ: only d_out / d_in are read).
    """
    full = {}
    for key, value in arrays.items():
        layer, factor = _lora_owner(key)
        kept_out, kept_in = index_maps.get(layer, (None, None))
        if factor == "lora_B" and kept_out is not None:
            recovered = np.zeros((full_shapes[key][0], value.shape[1]), dtype=value.dtype)
            recovered[kept_out.numpy()] = value
        elif factor == "lora_A" and kept_in is not None:
            recovered = np.zeros((value.shape[0], full_shapes[key][1]), dtype=value.dtype)
            recovered[:, kept_in.numpy()] = value
        else:
            recovered = value
        full[key] = recovered
    return full


def _lora_owner(key: str) -> tuple[str, str]:
    """`x.query.lora_B.weight` -> ("x.query", "lora_B"); ("", "") for a key outside a LoRA factor."""
    for factor in ("lora_A", "lora_B"):
        marker = f".{factor}."
        if marker in key:
            return key.split(marker)[0], factor
    return "", ""
