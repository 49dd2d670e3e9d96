"""Swapping a loaded HF model's frozen base linears for quantized ones (the QLoRA base of issue 5)."""

from __future__ import annotations

import copy

import pytest
import torch

from common.adapters import inject_adapters
from common.bases.blockwise import NF4, fake_quantize
from common.bases.quantized_linear import QuantizedLinear
from common.bases.replace import frozen_base_linears, linear_weight_bytes, quantize_frozen_base
from common.config import RunConfig


def _adapted_tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    inject_adapters(model, RunConfig(rank=4, target_modules="query,value"))
    with torch.no_grad():  # a non-zero B so the adapter branch matters in the comparison
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def test_replaces_exactly_the_frozen_base_linears():
    model = _adapted_tiny_bert()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    names = quantize_frozen_base(model, NF4)
    layer0 = {n for n in names if n.startswith("bert.encoder.layer.0.")}
    assert layer0 == {f"bert.encoder.layer.0.{n}" for n in (
        "attention.self.query.base", "attention.self.key", "attention.self.value.base",
        "attention.output.dense", "intermediate.dense", "output.dense")}
    assert "bert.pooler.dense" in names and len(names) == 2 * 6 + 1
    assert not any("lora_" in n or "classifier" in n for n in names)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in names)
    assert frozen_base_linears(model) == []  # nothing left to quantize


def test_quantized_model_equals_the_model_with_dequantized_weights():
    model = _adapted_tiny_bert()
    reference = copy.deepcopy(model)
    names = quantize_frozen_base(model, NF4)
    with torch.no_grad():
        for name in names:
            layer = reference.get_submodule(name)
            layer.weight.copy_(fake_quantize(layer.weight, NF4))
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_memory_drops_and_opacus_sees_only_the_adapter_and_head():
    from opacus import GradSampleModule

    model = _adapted_tiny_bert()
    before = linear_weight_bytes(model)
    quantize_frozen_base(model, NF4)
    after = linear_weight_bytes(model)
    assert after < 0.35 * before  # tiny layers: the fp32 biases, adapters and head stay (MiniLM: see report)
    model.train()
    private = GradSampleModule(model, loss_reduction="sum")
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(2))
    private(input_ids=ids).logits.sum().backward()
    sampled = [n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None]
    assert sampled and all("lora_" in n or "classifier" in n for n in sampled)
    assert len(sampled) == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("keep", [("classifier", "pooler")])
def test_keep_leaves_named_layers_in_full_precision(keep):
    model = _adapted_tiny_bert()
    names = quantize_frozen_base(model, NF4, keep=keep)
    assert "bert.pooler.dense" not in names and isinstance(model.bert.pooler.dense, torch.nn.Linear)


def test_base_run_config_key():
    from common.errors import ConfigError

    assert RunConfig().base == "fp32"
    assert RunConfig.from_flower({"base": "nf4"}).base == "nf4"
    for name in ("lq_lora", "loram", "qloram"):
        assert RunConfig.from_flower({"base": name}).base == name
    with pytest.raises(ConfigError, match="base = 'int4' is invalid: choose fp32 .*, nf4 .*, lq_lora .*, loram "
                                          ".* or qloram .*"):
        RunConfig.from_flower({"base": "int4"})
