"""One client round on the real model (MiniLM) with a tiny synthetic file: budget, freezing, payload."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.train_round import ClientIdentity, evaluate_round, train_round
from common.config import RunConfig
from common.model import build_model
from common.payload import trainable_state
from tests.conftest import write_toy_csv


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = write_toy_csv(tmp_path_factory.mktemp("data"))
    return RunConfig(dataset=str(path), examples_per_class=0, num_rounds=2, local_steps=2, batch_size=8,
                     max_seq_len=16, target_epsilon=4.0, rank=4, strategy="fedsvd")


def identity(tmp_path) -> ClientIdentity:
    return ClientIdentity(client_id="0", partition_id=0, num_partitions=2, ledger_dir=tmp_path)


def global_state(config):
    return trainable_state(build_model(config, num_labels=3).model)


def test_client_trains_planned_rounds_then_refuses(config, tmp_path):
    arrays = global_state(config)
    down = {k: v for k, v in arrays.items()}
    first = train_round(config, identity(tmp_path), down, ("lora_A",), server_round=1)
    second = train_round(config, identity(tmp_path), down, ("lora_A",), server_round=2)
    third = train_round(config, identity(tmp_path), down, ("lora_A",), server_round=3)
    assert not first.refused and not second.refused
    assert first.metrics["steps"] == 2 and first.metrics["epsilon"] < second.metrics["epsilon"] <= 4.0
    assert third.refused and third.arrays == {} and "would spend epsilon" in third.reason
    assert third.metrics["refused"] == 1 and third.metrics["num-examples"] == 0
    ledger = json.loads((tmp_path / "client-0.json").read_text())
    assert [row["round"] for row in ledger["history"]] == [1, 2]


def test_frozen_factor_is_not_sent_and_the_rest_changes(config, tmp_path):
    arrays = global_state(config)
    outcome = train_round(config, identity(tmp_path), arrays, ("lora_A",), server_round=1)
    assert outcome.arrays and not any(".lora_A." in key for key in outcome.arrays)
    assert "classifier.weight" in outcome.arrays
    changed = [k for k, v in outcome.arrays.items() if not np.allclose(v, arrays[k])]
    assert any(".lora_B." in k for k in changed)


def test_seeded_lora_a_is_identical_on_every_party(config):
    a, b = global_state(config), global_state(config)
    keys = [k for k in a if ".lora_A." in k]
    assert keys and all(np.array_equal(a[k], b[k]) for k in keys)


def test_evaluate_round_reports_loss_and_accuracy(config, tmp_path):
    metrics = evaluate_round(config, identity(tmp_path), global_state(config))
    assert metrics["num-examples"] > 0 and 0.0 <= metrics["eval-accuracy"] <= 1.0 and metrics["eval-loss"] > 0
