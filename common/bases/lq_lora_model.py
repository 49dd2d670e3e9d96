"""LQ-LoRA on a whole model (run config `base = "lq_lora"`): W0 ≈ Q + L1 L2 for every LoRA layer's base.

Per LoRA layer (`common.bases.lq_lora.lq_decompose`): Q becomes the frozen base (`QuantizedLinear`),
L2 (orthonormal rows) becomes A and L1 / s becomes B, so s B A = L1 L2 and the adapter starts non-zero
with the model's function ≈ W0's. Every other frozen backbone linear is quantized plainly (no low-rank
part: nothing would train it). Head and embeddings stay full precision.

Precision: `budget = 0` quantizes everything in NF4 (4.127 bits/param). A budget in bits/param runs
LQ-LoRA's ILP (`common.bases.mixed_precision.choose_configs`) over all quantized matrices: the error of a
LoRA layer's config is its decomposition error ‖W - Q - L1 L2‖², of any other its quantization error
‖W - deq(Q(W))‖², and the budget bounds the average storage of Q over all of them.

Fisher weighting (`lq-fisher = "public"`, paper Sec. 3.3): with the diagonal empirical Fisher F of every
quantized matrix on the server's public split (`common.bases.fisher`), each LoRA layer's low-rank step
minimises ‖D_r (W - Q - L1 L2) D_c‖_F with D_r 1 1ᵀ D_c the best rank-1 fit of √F
(`common.bases.lq_lora.row_col_weights`), and the ILP compares the errors in the same weighted norm
(for the other matrices ‖D_r (W - deq(Q(W))) D_c‖²). The quantization step itself stays unweighted.

Every input is a pretrained weight (or, with the Fisher, the public split) and every step is
deterministic (float64 Fisher and SVD, rounding, HiGHS), so all parties that build the model from the
same run config get the same base; the base checksum (`common.bases.checksum`) catches a party whose
linear algebra disagrees.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.adapters.lora import LoRALinear
from common.bases.blockwise import NF4, BlockQuantConfig, fake_quantize
from common.bases.lq_lora import LQDecomposition, RowColWeights, decomposition_error, lq_decompose, row_col_weights
from common.bases.mixed_precision import LQ_CONFIGS, choose_configs
from common.bases.quantized_linear import QuantizedLinear
from common.bases.replace import _replace, frozen_base_linears


def apply_lq_lora(model: nn.Module, rank: int, budget: float = 0.0, iters: int = 3,
                  configs: tuple[BlockQuantConfig, ...] = LQ_CONFIGS,
                  fisher: dict[str, torch.Tensor] | None = None) -> dict[str, BlockQuantConfig]:
    """Decompose every LoRA layer's base and quantize every other frozen linear, in place.

    Returns each replaced linear's quantization config. `rank` must equal the LoRA layers' rank.
    `fisher`: {frozen linear name: its diagonal Fisher} for every name of `frozen_base_linears(model)`
    (from public data, `public_fisher`); None is the data-free decomposition.
    """
    lora = {f"{name}.base": m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    names = frozen_base_linears(model)
    weights = {name: model.get_submodule(name).weight.detach() for name in names}
    scaled: dict[str, RowColWeights | None] = {name: None for name in names}
    if fisher is not None:
        missing = sorted(set(names) - set(fisher))
        if missing:
            raise ValueError(f"the Fisher lacks the frozen linears {missing[:3]}")
        scaled = {name: row_col_weights(fisher[name]) for name in names}
    choices = (configs,) if budget else ((NF4,),)
    table: dict[str, list[LQDecomposition | None]] = {}
    errors = np.zeros((len(names), len(choices[0])))
    for i, name in enumerate(names):
        table[name] = []
        for j, config in enumerate(choices[0]):
            if name in lora:
                decomposition = lq_decompose(weights[name], rank, config, iters, weights=scaled[name],
                                             fisher_data="none" if fisher is None else "public")
                errors[i, j] = decomposition.errors[decomposition.best] ** 2
            else:
                decomposition = None
                w = weights[name]
                no_low_rank = (w.new_zeros(w.shape[0], 1), w.new_zeros(1, w.shape[1]))
                errors[i, j] = decomposition_error(w, fake_quantize(w, config), *no_low_rank, scaled[name]) ** 2
            table[name].append(decomposition)
    if budget:
        bits = np.array([c.bits_per_param for c in configs])
        picked = choose_configs(errors, bits, [weights[n].numel() for n in names], budget)
    else:
        picked = [0] * len(names)
    chosen = {}
    for name, j in zip(names, picked):
        config, layer = choices[0][j], model.get_submodule(name)
        chosen[name] = config
        if name in lora:
            decomposition, adapter = table[name][j], lora[name]
            _replace(model, name, QuantizedLinear(decomposition.q, layer.bias, dtype=layer.weight.dtype)
                     .to(layer.weight.device))
            with torch.no_grad():
                adapter.lora_A.weight.copy_(decomposition.l2)
                adapter.lora_B.weight.copy_(decomposition.l1 / adapter.scaling)
        else:
            _replace(model, name, QuantizedLinear.from_linear(layer, config))
    return chosen


def public_fisher(model: nn.Module, config) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of every frozen linear of `model` (adapters injected, not yet quantized) on the
    run's public split (`public-examples` examples; run config `lq-fisher = "public"`)."""
    from transformers import AutoTokenizer

    from common.bases.fisher import diagonal_fisher
    from common.data.partition import public_split
    from common.model import resolve_model_path
    from common.tensors import encode

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model))
    data = encode(tokenizer, public_split(config), config.max_seq_len)
    return diagonal_fisher(model, frozen_base_linears(model), data)
