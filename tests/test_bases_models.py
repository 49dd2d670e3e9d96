"""The selectable bases on a tiny BERT: LQ-LoRA's start state, LoRAM's recovery of a whole model's adapter,
EoRA's init, the base checksum and the checks that refuse settings a base cannot honour."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.adapters import inject_adapters
from common.adapters.lora import LoRALinear
from common.bases.blockwise import NF4, dequantize
from common.bases.checksum import base_bytes, base_checksum, frozen_base_tensors
from common.bases.eora import eora_from_covariance
from common.bases.eora_init import eora_initialise, input_covariances
from common.bases.fedsvd_form import fedsvd_form
from common.bases.lq_lora import lq_decompose
from common.bases.lq_lora_model import apply_lq_lora
from common.bases.mixed_precision import LQ_CONFIGS
from common.bases.pruning import prune_bert, recover_arrays
from common.bases.quantized_linear import QuantizedLinear
from common.bases.registry import check_base, check_base_strategy
from common.bases.replace import dequantize_frozen_base, quantize_frozen_base
from common.config import LQ_MIN_BITS, RunConfig
from common.errors import ConfigError
from common.payload import trainable_state

RANK = 4
LORA = RunConfig(rank=RANK, alpha=8.0, target_modules="query,value,dense")


def _bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model.eval()


def _ids(seed=1, n=3, length=9):
    return torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(seed))


def _lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def test_lq_lora_starts_the_adapter_at_l1_l2_with_q_as_the_frozen_base():
    model = _bert()
    reference = copy.deepcopy(model)
    inject_adapters(model, LORA)
    weights = {name: m.base.weight.detach().clone() for name, m in _lora_layers(model).items()}
    chosen = apply_lq_lora(model, RANK, budget=0.0, iters=2)
    assert set(chosen.values()) == {NF4}
    for name, layer in _lora_layers(model).items():
        assert isinstance(layer.base, QuantizedLinear)
        expected = lq_decompose(weights[name], RANK, NF4, iters=2)
        torch.testing.assert_close(layer.base.weight, dequantize(expected.q), rtol=0, atol=0)
        torch.testing.assert_close(layer.delta_weight(), expected.l1 @ expected.l2, rtol=1e-5, atol=1e-6)
        a = layer.lora_A.weight
        torch.testing.assert_close(a @ a.T, torch.eye(RANK), atol=1e-5, rtol=0)  # FedSVD form: A orthonormal
        assert layer.lora_B.weight.requires_grad and layer.lora_A.weight.requires_grad
    # W0 ≈ Q + L1 L2 beats W0 ≈ Q(W0): the model starts closer to the full-precision one than plain NF4
    plain = copy.deepcopy(reference)
    inject_adapters(plain, LORA)
    quantize_frozen_base(plain)
    inject_adapters(reference, LORA)
    with torch.no_grad():
        target = reference(input_ids=_ids()).logits
        lq_gap = (model(input_ids=_ids()).logits - target).norm()
        nf4_gap = (plain(input_ids=_ids()).logits - target).norm()
    assert lq_gap < nf4_gap
    assert not any(isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and "lora_" not in n
                   for n, m in model.named_modules() if "classifier" not in n)  # every frozen linear quantized


def test_lq_lora_mixed_precision_respects_the_budget():
    model = _bert()
    inject_adapters(model, LORA)
    chosen = apply_lq_lora(model, RANK, budget=3.0, iters=1, configs=LQ_CONFIGS[:6])  # 2, 3 and 4 bits
    numels = {name: model.get_submodule(name).out_features * model.get_submodule(name).in_features for name in chosen}
    average = sum(chosen[n].bits_per_param * numels[n] for n in chosen) / sum(numels.values())
    assert LQ_MIN_BITS <= average <= 3.0
    assert len({c.bits for c in chosen.values()}) > 1  # really mixed
    assert all(model.get_submodule(n).config == c for n, c in chosen.items())


def test_loram_recovered_adapter_equals_the_pruned_one_on_kept_coordinates():
    """Recovered into the full model, every LoRA layer's ΔW restricted to the kept rows and columns is the
    pruned model's ΔW, and is zero elsewhere; the full model's frozen W0 is untouched."""
    full = _bert()
    pruned = prune_bert(full, 0.5)
    inject_adapters(full, LORA)
    inject_adapters(pruned.model, LORA)
    with torch.no_grad():
        for i, p in enumerate(p for n, p in pruned.model.named_parameters() if "lora_" in n):
            p.normal_(generator=torch.Generator().manual_seed(i))
    state = trainable_state(pruned.model)
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    recovered = recover_arrays(state, pruned.index_maps, shapes)
    assert all(recovered[k].shape == shapes[k] for k in recovered)
    full.load_state_dict({k: torch.from_numpy(v) for k, v in recovered.items()}, strict=False)
    full_layers, small_layers = _lora_layers(full), _lora_layers(pruned.model)
    assert any(pruned.index_maps.get(n, (None, None))[1] is not None for n in full_layers)  # output.dense-like inputs pruned too
    for name, layer in full_layers.items():
        kept_out, kept_in = pruned.index_maps.get(name, (None, None))
        rows = torch.arange(layer.base.out_features) if kept_out is None else kept_out
        cols = torch.arange(layer.base.in_features) if kept_in is None else kept_in
        delta = layer.delta_weight()
        torch.testing.assert_close(delta[rows][:, cols], small_layers[name].delta_weight(), rtol=0, atol=1e-6)
        outside = torch.ones_like(delta, dtype=torch.bool)
        outside[rows[:, None], cols[None, :]] = False
        assert torch.all(delta[outside] == 0)
        torch.testing.assert_close(layer.base.weight[rows][:, cols], small_layers[name].base.weight, rtol=0, atol=0)


def test_eora_init_sets_lora_to_the_activation_weighted_compensation():
    reference = _bert()
    inject_adapters(reference, LORA)
    model = copy.deepcopy(reference)
    quantize_frozen_base(model)
    ids = _ids(seed=3, n=8)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0  # padding: not part of the calibration
    data = torch.utils.data.TensorDataset(ids, mask, torch.zeros(8, dtype=torch.long))
    covariances = input_covariances(model, data, 4, torch.device("cpu"))
    before = copy.deepcopy(model)
    layers = eora_initialise(model, reference, data, 4, torch.device("cpu"))
    assert layers == sorted(_lora_layers(model))
    for name in layers:
        layer, full = model.get_submodule(name), reference.get_submodule(name)
        error = full.base.weight.double() - layer.base.weight.double()
        b, a = fedsvd_form(*eora_from_covariance(error, covariances[name], RANK))
        torch.testing.assert_close(layer.delta_weight().double(), b @ a, rtol=1e-4, atol=1e-6)
        # the closed form: EoRA's residual in the activation metric is below plain NF4's (no adapter)
        residual = error - layer.delta_weight().double()
        weighted = torch.trace(residual @ covariances[name] @ residual.T)
        assert weighted < torch.trace(error @ covariances[name] @ error.T)
    with torch.no_grad():
        target = reference(input_ids=ids[:, :6]).logits
        assert (model(input_ids=ids[:, :6]).logits - target).norm() < (before(input_ids=ids[:, :6]).logits - target).norm()


def test_checksum_covers_the_frozen_base_only_and_sees_any_change():
    model = _bert()
    inject_adapters(model, LORA)
    quantize_frozen_base(model)
    digest, size = base_checksum(model), base_bytes(model)
    keys = frozen_base_tensors(model)
    assert any(k.endswith("query.base.codes") for k in keys) and not any("lora_" in k or "classifier" in k for k in keys)
    with torch.no_grad():  # adapter factors and the head travel in rounds: not part of the base
        for name, p in model.named_parameters():
            if "lora_" in name or p.requires_grad:
                p.add_(1.0)
    assert base_checksum(model) == digest and base_bytes(model) == size
    assert size == sum(t.numel() * t.element_size() for t in keys.values())
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.base.absmax[0] += 1
    assert base_checksum(model) != digest
    assert base_checksum(copy.deepcopy(model)) == base_checksum(model)


def test_dequantized_base_gives_the_same_function():
    model = _bert()
    inject_adapters(model, LORA)
    quantize_frozen_base(model)
    plain = copy.deepcopy(model)
    assert dequantize_frozen_base(plain)
    assert not any(isinstance(m, QuantizedLinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=_ids()).logits, model(input_ids=_ids()).logits, atol=1e-6, rtol=0)


class _Strategy:
    fold_global, rank_heterogeneous, static_factors = False, False, ()


class _FoldStrategy(_Strategy):
    fold_global = True


class _StaticA(_Strategy):
    static_factors = ("lora_A",)


@pytest.mark.parametrize("settings, match", [
    ({"base": "loram", "adapter": "dora"}, "needs adapter = 'lora'"),
    ({"base": "nf4", "base-init": "eora", "adapter": "dora"}, "needs adapter = 'lora'"),
])
def test_bases_refuse_adapters_they_cannot_initialise_or_recover(settings, match):
    with pytest.raises(ConfigError, match=match):
        check_base(RunConfig.from_flower(settings))


@pytest.mark.parametrize("settings, strategy, match", [
    ({"base": "qloram", "strategy": "flora"}, _FoldStrategy, "folds the global LoRA into the base"),
    ({"base": "nf4", "base-init": "eora", "strategy": "ffa_lora"}, _StaticA, "rebuilds A from the seed"),
])
def test_bases_refuse_strategies_they_cannot_honour(settings, strategy, match):
    with pytest.raises(ConfigError, match=match):
        check_base_strategy(RunConfig.from_flower(settings), strategy)
    check_base_strategy(RunConfig.from_flower(settings), _Strategy)  # the same settings with a plain strategy


@pytest.mark.parametrize("settings, match", [
    ({"base": "lq_lora", "lq-bits": 1.5}, "at least 2.0635"),
    ({"base": "lq_lora", "lq-bits": -3.0}, "lq-bits = -3.0 is invalid"),
    ({"base": "lq_lora", "lq-bits": float("inf")}, "lq-bits = inf is invalid"),
    ({"base": "nf4", "lq-bits": 3.0}, "LQ-LoRA's bit budget but base = 'nf4'"),
    ({"base": "lq_lora", "lq-iters": 0}, "1..100 iterations"),
    ({"base": "lq_lora", "lq-fisher": "private"}, "would need their DP gradients, charged to their privacy"),
    ({"base": "nf4", "lq-fisher": "public"}, "weights LQ-LoRA's decomposition but base = 'nf4'"),
    ({"base": "lq_lora", "lq-fisher": "diag"}, "choose one of none, public, private"),
    ({"base": "lq_lora", "client-ranks": "2,4", "strategy": "hetlora"}, "client-ranks cannot be combined"),
    ({"base": "loram", "prune-ratio": 0.0}, "prune-ratio = 0.0 is invalid"),
    ({"base": "qloram", "prune-ratio": 1.0}, "strictly between 0 and 1"),
    ({"base": "fp32", "base-init": "eora"}, "no compression error"),
    ({"base": "loram", "base-init": "eora"}, "pruned, not quantized"),
    ({"base": "nf4", "base-init": "svd"}, "choose none .* or eora"),
    ({"base": "int4"}, "choose fp32 .*nf4 .*lq_lora .*loram .*qloram"),
])
def test_bad_base_settings_are_one_clear_config_error(settings, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flower(settings)


def test_lq_min_bits_is_the_cheapest_lq_config():
    assert LQ_MIN_BITS == min(c.bits_per_param for c in LQ_CONFIGS)
    assert RunConfig.from_flower({"base": "lq_lora", "lq-bits": LQ_MIN_BITS}).lq_bits == LQ_MIN_BITS


def test_recover_arrays_leaves_unpruned_keys_alone():
    state = {"classifier.weight": np.ones((3, 8), np.float32), "x.lora_B.weight": np.ones((2, 1), np.float32)}
    maps = {"x": (torch.tensor([0, 3]), None)}
    out = recover_arrays(state, maps, {"classifier.weight": (3, 8), "x.lora_B.weight": (5, 1)})
    assert out["classifier.weight"] is state["classifier.weight"]
    assert out["x.lora_B.weight"][:, 0].tolist() == [1, 0, 0, 1, 0]
