"""Layer sampling (LISA, OwLore: METHODS.md cards 49 and 46): each round trains only a few transformer layers.

The server draws `layers-per-round` (γ) of the N_L transformer layers that hold trainable tensors, from the
run seed and the round number, and sends the choice with the round's instruction (`train-layers`). A
client trains the tensors of those layers plus everything that belongs to no layer (the classifier head,
trained embeddings, a pooler), and sends exactly those; the server averages them and keeps the other
layers' global values. Within a round the trainable set is fixed, so the client's Opacus optimizer is
built once per round for it (the card's "rebuild the private optimizer when the set changes").

The draw weights come from a registry:
- `lisa`: uniform, data-independent: free under DP.
- `owlore`: p_ℓ ∝ LOD_ℓ, the layer's outlier ratio (OWL): the fraction of entries of A = |W0| ⊙ ‖X‖₂ (input
  feature norms over calibration tokens) above `owlore-threshold` times A's mean, pooled over the layer's
  adapted matrices. The activations are read on the server's public split only (`public-examples`, no
  privacy cost); private calibration is not built. Layers with LOD 0 are never drawn.

The card's K steps between draws is one round here: the layer set is the server's decision, and a round is
its unit. Full-rank updates (LISA proper) are adapter `full`; OwLore's GaLore inside the sampled layers is
`update-rule = "galore"` on top (both compose with any of these; see the README).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError

# `...encoder.layer.3.attention...` (BERT, RoBERTa), `...layers.3...` (LLaMA), `...h.3...` (GPT-2), `block.3`
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer layer a parameter name belongs to, or None (head, embeddings, pooler: always trained)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layers_of(names: Iterable[str]) -> list[int]:
    """The sorted distinct layer indices among `names`: the layers a sampler can draw."""
    return sorted({i for i in map(layer_index, names) if i is not None})


def sample_layers(weights: Sequence[float], count: int, seed: int, server_round: int) -> tuple[int, ...]:
    """`count` positions of `weights` drawn without replacement with probability ∝ weight, sorted; the same
    (seed, round) gives the same draw on every party and after a resume."""
    p = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng([seed, server_round, 0x115A])
    return tuple(sorted(int(i) for i in rng.choice(len(p), size=count, replace=False, p=p / p.sum())))


def drawn_layers(layer_ids: Sequence[int], weights: Sequence[float], count: int, seed: int, server_round: int
                 ) -> tuple[int, ...]:
    """The layers (from `layer_ids`, one weight each) that round `server_round` trains."""
    return tuple(layer_ids[i] for i in sample_layers(weights, count, seed, server_round))


def outlier_ratio(weights: Sequence[torch.Tensor], input_norms: Sequence[torch.Tensor], threshold: float) -> float:
    """OWL's layer outlier ratio: the fraction of entries of A = |W| ⊙ ‖X‖₂ (row-broadcast input norms), over all
    the layer's matrices, above `threshold` times the mean of A over the layer."""
    scores = torch.cat([(w.detach().abs().float() * n.float()[None, :]).flatten()
                        for w, n in zip(weights, input_norms)])
    return float((scores > threshold * scores.mean()).float().mean())


@torch.no_grad()
def input_norms(model: nn.Module, modules: list[str], data, batch_size: int, device: torch.device
                ) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of each of `modules`, over the non-padding tokens of `data`
    (a TensorDataset of input_ids, attention_mask, labels)."""
    model = model.to(device).eval()
    sums = {name: None for name in modules}
    mask_now: list[torch.Tensor] = []

    def hook(name):
        def record(module, args, output):
            x = args[0]
            mask = mask_now[0].bool()
            x = x[mask] if x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])  # (real tokens, d_in)
            squares = (x.float() ** 2).sum(dim=0)
            sums[name] = squares if sums[name] is None else sums[name] + squares
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in modules]
    try:
        for start in range(0, len(data), batch_size):
            ids, mask, _ = data[start:start + batch_size]
            mask_now[:] = [mask.to(device)]
            model(input_ids=ids.to(device), attention_mask=mask_now[0])
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt().cpu() for name, s in sums.items()}


@dataclass(frozen=True)
class LayerSampler:
    # (run config, model, adapted module names, public data or None, layers) -> one weight per layer
    weights: Callable[..., list[float]]
    summary: str
    reads_public_data: bool = False


def _uniform(config, model, modules, data, layers) -> list[float]:
    return [1.0] * len(layers)


def _outlier_weights(config, model, modules, data, layers) -> list[float]:
    from common.model import pick_device

    by_layer = {layer: [m for m in modules if layer_index(m + ".") == layer] for layer in layers}
    norms = input_norms(model, [m for ms in by_layer.values() for m in ms], data, config.eval_batch_size,
                        pick_device())
    return [outlier_ratio([model.get_submodule(m).base.weight for m in by_layer[layer]],
                          [norms[m] for m in by_layer[layer]], config.owlore_threshold) for layer in layers]


LAYER_SAMPLERS: dict[str, LayerSampler] = {
    "lisa": LayerSampler(weights=_uniform, summary="LISA: γ layers uniformly at random each round"),
    "owlore": LayerSampler(weights=_outlier_weights, reads_public_data=True,
                           summary="OwLore: γ layers each round, with probability ∝ the layer's outlier ratio "
                                   "on the public split"),
}


def get_layer_sampler(name: str) -> LayerSampler:
    if name not in LAYER_SAMPLERS:
        raise ConfigError(f"unknown layer-sampling {name!r}; available: none, {', '.join(sorted(LAYER_SAMPLERS))}")
    return LAYER_SAMPLERS[name]


def layer_weights(config, layers: list[int]) -> list[float]:
    """The run's draw weight of each of `layers`, checked: enough layers can be drawn each round. OwLore's
    outlier ratios are read on a full-precision copy of the model (a quantized or pruned base would change
    |W0|), with the adapters at their start, on the public split."""
    sampler = get_layer_sampler(config.layer_sampling)
    if sampler.reads_public_data:
        import dataclasses

        from common.data.partition import global_test_set, public_split
        from common.model import build_model
        from common.tensors import encode

        num_labels = len(global_test_set(config).label_names)
        adapted = build_model(dataclasses.replace(config, base="fp32", base_init="none"), num_labels)
        data = encode(adapted.tokenizer, public_split(config), config.max_seq_len)
        weights = sampler.weights(config, adapted.model, adapted.adapted_modules, data, layers)
    else:
        weights = sampler.weights(config, None, [], None, layers)
    drawable = sum(w > 0 for w in weights)
    if config.layers_per_round > drawable:
        what = (f"{len(layers)} layers hold trainable tensors ({', '.join(map(str, layers))})" if
                drawable == len(layers) else f"only {drawable} of the {len(layers)} layers have outlier ratio > 0 "
                f"at owlore-threshold = {config.owlore_threshold:g}")
        raise ConfigError(f"layers-per-round = {config.layers_per_round} but {what}: lower layers-per-round"
                          + ("" if drawable == len(layers) else " or owlore-threshold"))
    return weights


def freeze_other_layers(model: nn.Module, layers: Sequence[int]) -> None:
    """Stop training every tensor of a layer outside `layers` (tensors of no layer keep training)."""
    keep = set(layers)
    for name, parameter in model.named_parameters():
        index = layer_index(name)
        if parameter.requires_grad and index is not None and index not in keep:
            parameter.requires_grad_(False)
