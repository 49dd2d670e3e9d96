"""The three strategies on real Flower messages: what travels, the aggregation closed forms, bad replies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.errors import ConfigError
from common.payload import from_record, to_record
from server.aggregation import fedsvd_reorthogonalize
from server.strategies import STRATEGIES, get_strategy
from server.strategies.fedavg_lora import FedAvgLoRA
from server.strategies.fedsvd import FedSVD
from server.strategies.ffa_lora import FFALoRA

LAYER = "bert.encoder.layer.0.attention.self.query"
A, B, HEAD = f"{LAYER}.lora_A.weight", f"{LAYER}.lora_B.weight", "classifier.weight"
RANK, D = 3, 10


def global_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {A: rng.normal(size=(RANK, D)).astype(np.float32), B: rng.normal(size=(D, RANK)).astype(np.float32),
            HEAD: rng.normal(size=(4, D)).astype(np.float32)}


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's runtime sets the process' task identity before a ServerApp builds messages; so do we."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class NodeList:
    """The one Grid method sampling needs (Flower's Grid is abstract and talks to a SuperLink)."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def strategy_of(cls, tmp_path, clients=2):
    strategy = cls(clients_per_round=clients, seed=7, run_dir=str(tmp_path))
    strategy.global_arrays = global_state()
    strategy.last_bytes_down = 0
    return strategy


def instruction(node_id: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id,
                   message_type=MessageType.TRAIN)


def reply(node_id: int, arrays: dict | None, examples: int = 10, refused: int = 0) -> Message:
    """What `client/client_app.py` sends back."""
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "first-loss": 2.0, "epsilon": 0.5,
                                 "refused": refused, "steps": 5}),
        "privacy": ConfigRecord({"client-id": str(node_id), "reason": "budget" if refused else "",
                                 "ledger": json.dumps({"client_id": str(node_id), "history": []})}),
    })
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    return Message(content=content, reply_to=instruction(node_id))


def client_update(strategy, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in strategy.global_arrays.items()
            if k in strategy.uplink_keys()}


def test_registry_lists_exactly_the_three_strategies():
    assert set(STRATEGIES) == {"fedavg_lora", "ffa_lora", "fedsvd"}
    with pytest.raises(ConfigError, match="unknown strategy 'fedprox'; available: fedavg_lora, fedsvd, ffa_lora"):
        get_strategy("fedprox")


def test_what_travels(tmp_path):
    fedavg, ffa, fedsvd = (strategy_of(cls, tmp_path) for cls in (FedAvgLoRA, FFALoRA, FedSVD))
    assert fedavg.uplink_keys() == {A, B, HEAD} and set(fedavg.downlink(fedavg.global_arrays)) == {A, B, HEAD}
    assert ffa.uplink_keys() == {B, HEAD} and set(ffa.downlink(ffa.global_arrays)) == {B, HEAD}  # A: a seed
    assert fedsvd.uplink_keys() == {B, HEAD} and set(fedsvd.downlink(fedsvd.global_arrays)) == {A, B, HEAD}


def test_fedavg_lora_averages_every_factor_by_examples(tmp_path):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    updates = [client_update(strategy, k) for k in range(2)]
    arrays, metrics = strategy.aggregate_train(1, [reply(1, updates[0], 10), reply(2, updates[1], 30)])
    out = from_record(arrays)
    for key in (A, B, HEAD):
        np.testing.assert_allclose(out[key], 0.25 * updates[0][key] + 0.75 * updates[1][key], rtol=1e-5, atol=1e-6)
    assert metrics["clients-trained"] == 2 and metrics["train-loss"] == pytest.approx(1.0)
    assert set(strategy.ledgers) == {"1", "2"}


def test_ffa_lora_averages_b_and_keeps_a(tmp_path):
    strategy = strategy_of(FFALoRA, tmp_path)
    updates = [client_update(strategy, k) for k in range(3)]
    arrays, _ = strategy.aggregate_train(1, [reply(k + 1, u, n) for k, (u, n) in enumerate(zip(updates, (1, 1, 2)))])
    out = from_record(arrays)
    mean_b = (updates[0][B] + updates[1][B] + 2 * updates[2][B]) / 4
    np.testing.assert_allclose(out[B], mean_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[A], strategy.global_arrays[A])
    # Exact: the new product is the average of the clients' products.
    mean_product = sum(w * u[B] @ strategy.global_arrays[A] for u, w in zip(updates, (1, 1, 2))) / 4
    np.testing.assert_allclose(out[B] @ out[A], mean_product, rtol=1e-4, atol=1e-5)


def test_fedsvd_averages_b_then_reorthogonalizes(tmp_path):
    strategy = strategy_of(FedSVD, tmp_path)
    updates = [client_update(strategy, k) for k in range(2)]
    arrays, _ = strategy.aggregate_train(2, [reply(1, updates[0], 20), reply(2, updates[1], 20)])
    out = from_record(arrays)
    mean_b = (updates[0][B] + updates[1][B]) / 2
    expected_b, expected_a = fedsvd_reorthogonalize(mean_b, strategy.global_arrays[A])
    np.testing.assert_allclose(out[B], expected_b, atol=1e-5)
    np.testing.assert_allclose(out[A], expected_a, atol=1e-5)
    np.testing.assert_allclose(out[B] @ out[A], mean_b @ strategy.global_arrays[A], atol=1e-4)
    np.testing.assert_allclose(out[A] @ out[A].T, np.eye(RANK), atol=1e-5)
    np.testing.assert_allclose(out[HEAD], (updates[0][HEAD] + updates[1][HEAD]) / 2, atol=1e-6)


def test_refused_failed_and_malformed_replies_are_skipped(tmp_path):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    good = client_update(strategy, 0)
    wrong_shape = {**good, B: np.zeros((D + 1, RANK), np.float32)}
    not_finite = {**good, HEAD: np.full(good[HEAD].shape, np.nan, np.float32)}
    missing_key = {k: v for k, v in good.items() if k != A}
    failed = Message(Error(code=0, reason="client crashed"), reply_to=instruction(9))
    replies = [reply(1, good, 10), reply(2, None, 0, refused=1), reply(3, wrong_shape), reply(4, not_finite),
               reply(5, missing_key), reply(6, good, examples=0), failed]
    arrays, metrics = strategy.aggregate_train(4, replies)
    for key in good:
        np.testing.assert_allclose(from_record(arrays)[key], good[key])
    assert metrics["clients-trained"] == 1 and metrics["clients-refused"] == 1
    assert strategy.refusals[4] == ["2"]


def test_no_usable_reply_leaves_the_global_adapter_unchanged(tmp_path):
    strategy = strategy_of(FedSVD, tmp_path)
    arrays, metrics = strategy.aggregate_train(3, [reply(1, None, 0, refused=1), reply(2, None, 0, refused=1)])
    assert arrays is None  # Flower keeps the previous global arrays
    assert metrics["clients-trained"] == 0 and metrics["clients-refused"] == 2


@pytest.mark.parametrize("cls,a_travels", [(FFALoRA, False), (FedSVD, True), (FedAvgLoRA, True)])
def test_configure_train_samples_seeded_clients_and_sends_the_right_tensors(tmp_path, cls, a_travels):
    strategy = cls(clients_per_round=2, seed=7, run_dir=str(tmp_path))
    grid = NodeList([11, 12, 13, 14, 15])
    record = to_record(global_state())
    first = list(strategy.configure_train(1, record, ConfigRecord({}), grid))
    again = list(cls(clients_per_round=2, seed=7, run_dir=str(tmp_path))
                 .configure_train(1, record, ConfigRecord({}), grid))
    assert [m.metadata.dst_node_id for m in first] == [m.metadata.dst_node_id for m in again]
    assert len({m.metadata.dst_node_id for m in first}) == 2
    rounds = [sorted(m.metadata.dst_node_id for m in strategy.configure_train(r, record, ConfigRecord({}), grid))
              for r in range(1, 9)]
    assert len({tuple(r) for r in rounds}) > 1, "different rounds should sample different clients"
    for message in first:
        sent = set(message.content["arrays"].keys())
        assert (A in sent) is a_travels and {B, HEAD} <= sent
        assert message.content["config"]["frozen"] == ",".join(cls.frozen_factors)
        assert isinstance(message.content["arrays"], ArrayRecord)
