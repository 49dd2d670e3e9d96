"""`base = "nf4"` in a run: the client trains a DP round on the NF4 base of the real MiniLM, the payload is
the fp32 run's, and export folds the adapter into the full-precision weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from client.train_round import ClientIdentity, train_round
from common.bases.quantized_linear import QuantizedLinear
from common.config import RunConfig
from common.export import adapted_with, merge_into_base
from common.model import build_model
from common.payload import trainable_state
from tests.conftest import write_toy_csv


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    path = write_toy_csv(tmp_path_factory.mktemp("data"))
    fp32 = RunConfig(dataset=str(path), examples_per_class=0, num_rounds=1, local_steps=2, batch_size=8,
                     max_seq_len=16, target_epsilon=4.0, rank=4, strategy="fedavg_lora")
    return fp32, dataclasses.replace(fp32, base="nf4")


def test_nf4_base_quantizes_the_backbone_and_keeps_head_and_adapters_fp32(configs):
    fp32, nf4 = configs
    model = build_model(nf4, num_labels=3).model
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert any(name.endswith("attention.self.query.base") for name in quantized)
    assert any(name.endswith("intermediate.dense") for name in quantized)
    assert not any("classifier" in name or "lora_" in name for name in quantized)
    assert sorted(trainable_state(model)) == sorted(trainable_state(build_model(fp32, num_labels=3).model))


def test_a_dp_round_on_the_nf4_base_and_its_export_on_the_fp32_base(configs, tmp_path):
    fp32, nf4 = configs
    start = trainable_state(build_model(nf4, num_labels=3).model)
    outcome = train_round(nf4, ClientIdentity("0", 0, 2, tmp_path), start, (), server_round=1)
    assert not outcome.refused and outcome.metrics["steps"] == 2 and 0 < outcome.metrics["epsilon"] <= 4.0
    assert set(outcome.arrays) == set(start)
    assert any(not np.allclose(outcome.arrays[k], start[k]) for k in outcome.arrays if ".lora_B." in k)
    exported = adapted_with(nf4, outcome.arrays, ["a", "b", "c"])
    assert not any(isinstance(m, QuantizedLinear) for m in exported.model.modules())  # full precision
    reference = adapted_with(fp32, outcome.arrays, ["a", "b", "c"]).model
    tokens = exported.tokenizer(["a short sentence", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reference(**tokens).logits
        merged = merge_into_base(exported.model)(**tokens).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~20 s of CPU: the LQ decomposition of MiniLM plus a DP round
def test_a_dp_round_on_the_lq_lora_base_starts_at_l1_l2_and_reports_its_base(configs, tmp_path):
    """LQ-LoRA: the adapter starts non-zero (s B A = L1 L2), trains under DP-SGD on Q, and the reply's base
    checksum is the one every party computes from the same run config."""
    fp32, _ = configs
    lq = dataclasses.replace(fp32, base="lq_lora", lq_iters=1, strategy="fedsvd")
    adapted = build_model(lq, num_labels=3)
    start = trainable_state(adapted.model)
    assert all(np.abs(start[k]).max() > 0 for k in start if ".lora_B." in k)
    outcome = train_round(lq, ClientIdentity("0", 0, 2, tmp_path), start, ("lora_A",), server_round=1)
    assert not outcome.refused and outcome.metrics["steps"] == 2
    assert set(outcome.arrays) == {k for k in start if ".lora_A." not in k}
    assert outcome.extra["base-sha256"] == adapted.base_sha256 != build_model(fp32, num_labels=3).base_sha256
