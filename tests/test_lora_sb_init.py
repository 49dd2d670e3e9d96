"""LoRA-SB's data-driven init: the bases' closed form, the public and the private (DP) gradient, the ledger."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from client.adapter_init import init_round
from client.train_round import ClientIdentity, train_round
from common.adapters.lora_sb import LoRASBConfig, bases_from_gradient
from common.config import RunConfig
from common.data.partition import client_data, public_split
from common.errors import DataError
from common.gradient_init import frozen_factors_from, public_gradients
from common.model import build_model
from common.payload import load_state, trainable_state
from common.privacy import PrivacyStep, epsilon_of
from common.tensors import encode
from tests.conftest import write_toy_csv


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = write_toy_csv(tmp_path_factory.mktemp("data"))
    return RunConfig(dataset=str(path), examples_per_class=0, num_rounds=2, local_steps=2, batch_size=8,
                     max_seq_len=16, target_epsilon=4.0, rank=4, adapter="lora_sb", strategy="fedavg_lora",
                     init_data="private", public_examples=12)


def identity(tmp_path) -> ClientIdentity:
    return ClientIdentity(client_id="0", partition_id=0, num_partitions=2, ledger_dir=tmp_path)


def test_bases_are_the_orthonormal_top_singular_vectors_of_the_sign_step():
    gradient = torch.randn(10, 12, generator=torch.Generator().manual_seed(0))
    factors = bases_from_gradient(gradient, LoRASBConfig(rank=3))
    b, a = factors["frozen_B.weight"].double(), factors["frozen_A.weight"].double()
    torch.testing.assert_close(b.T @ b, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    u, s, vh = torch.linalg.svd(-torch.sign(gradient).double())
    best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young: the projection onto the bases is the best rank-3 step
    torch.testing.assert_close(b @ (b.T @ -torch.sign(gradient).double() @ a.T) @ a, best, atol=1e-5, rtol=0)


def test_without_noise_the_client_gradient_is_the_public_gradient_of_the_same_examples(config, tmp_path):
    """q = 1 and no noise or clipping: the init step's `w - w'` is exactly the mean gradient."""
    exact = dataclasses.replace(config, target_epsilon=float("inf"), batch_size=1000)
    outcome = init_round(exact, identity(tmp_path))
    adapted = build_model(exact, num_labels=3)
    data = client_data(exact, 0, 2).train
    reference = public_gradients(adapted.model, encode(adapted.tokenizer, data, exact.max_seq_len), 1000,
                                 torch.device("cpu"))
    assert set(outcome.arrays) == set(reference) == set(adapted.adapted_modules)
    for name, gradient in reference.items():
        np.testing.assert_allclose(outcome.arrays[name], gradient.numpy(), atol=1e-6, rtol=1e-3)


def test_private_init_is_round_0_of_the_ledger_and_the_calibration_counts_it(config, tmp_path):
    outcome = init_round(config, identity(tmp_path))
    assert not outcome.refused and outcome.metrics["steps"] == 1
    arrays = {**trainable_state(build_model(config, num_labels=3).model),
              **frozen_factors_from(config, {k: torch.from_numpy(v) for k, v in outcome.arrays.items()})}
    for server_round in (1, 2):
        assert not train_round(config, identity(tmp_path), arrays, (), server_round).refused
    history = [PrivacyStep.from_dict(row) for row in json.loads((tmp_path / "client-0.json").read_text())["history"]]
    assert [(row.round, row.steps) for row in history] == [(0, 1), (1, 2), (2, 2)]
    spent = epsilon_of(history, config.delta)
    assert 0.97 * config.target_epsilon < spent <= config.target_epsilon  # calibrated for 1 + 2 x 2 steps


def test_bases_from_the_init_reach_the_model_and_only_the_core_trains(config, tmp_path):
    adapted = build_model(config, num_labels=3)
    gradients = {name: torch.randn(384, 384, generator=torch.Generator().manual_seed(1))
                 for name in adapted.adapted_modules}
    frozen = frozen_factors_from(config, gradients)
    assert len(frozen) == 2 * len(adapted.adapted_modules)
    load_state(adapted.model, frozen)
    layer = adapted.model.get_submodule(adapted.adapted_modules[0])
    np.testing.assert_array_equal(layer.frozen_B.weight.detach().numpy(),
                                  frozen[f"{adapted.adapted_modules[0]}.frozen_B.weight"])
    assert not set(frozen) & set(adapted.trainable)


def test_public_split_is_disjoint_from_the_clients_and_only_exists_when_used(config):
    public = dataclasses.replace(config, init_data="public")
    held = set(public_split(public).texts)
    assert len(held) == 12
    for pid in range(2):
        data = client_data(public, pid, 2)
        assert not held & set(data.train.texts) and not held & set(data.test.texts)
    with pytest.raises(DataError, match="has no public split"):
        public_split(config)
    with pytest.raises(DataError, match="public-examples = 500 leaves no training data"):
        public_split(dataclasses.replace(public, public_examples=500))
