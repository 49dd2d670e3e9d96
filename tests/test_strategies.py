"""The three strategies on real Flower messages: what travels, the aggregation closed forms, bad replies."""

from __future__ import annotations

import json
import secrets

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

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
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def grid() -> InMemoryGrid:
    """Flower's in-process Grid (the one simulations use) over a link state with five connected nodes."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    for _ in range(5):
        node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                    heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP)
    run = state.get_run_info(run_ids=[run_id])[0]
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    TaskIdentity.task_id, TaskIdentity.run_id = run.primary_task_id, run.run_id
    return grid


def strategy_of(cls, tmp_path, clients=2):
    strategy = cls(clients_per_round=clients, seed=7, run_dir=str(tmp_path))
    strategy.global_arrays = global_state()
    strategy.last_bytes_down = 0  # set by configure_train, which these tests skip
    return strategy


def instruction(node_id: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id,
                   message_type=MessageType.TRAIN)


def reply(node_id: int, arrays: dict | None, examples: int = 10, refused: int = 0, loss: float = 1.0,
          epsilon: float = 0.5, to: Message | None = None) -> Message:
    """What `client/client_app.py` sends back (a refusal carries no arrays)."""
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": examples, "train-loss": loss, "first-loss": 2 * loss,
                                 "epsilon": epsilon, "refused": refused, "steps": 5}),
        "privacy": ConfigRecord({"client-id": str(node_id), "reason": "budget" if refused else "",
                                 "ledger": json.dumps(ledger_of(node_id))}),
        "adapter": ConfigRecord({"name": "lora"}),
    })
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    return Message(content=content, reply_to=to or instruction(node_id))


def ledger_of(node_id: int, rounds: int = 5) -> dict:
    """A client's ledger after training rounds 1..`rounds` (the server checks it covers the current round)."""
    return {"client_id": str(node_id),
            "history": [{"round": r, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": node_id}
                        for r in range(1, rounds + 1)]}


def client_update(strategy, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in strategy.global_arrays.items()
            if k in strategy.uplink_keys()}


def test_registry_lists_exactly_the_nine_strategies():
    assert set(STRATEGIES) == {"fedavg_lora", "ffa_lora", "fedsvd", "fedsa_lora", "hetlora", "flexlora", "flora",
                               "lora_lego", "fedsvd_het"}
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; available: fedavg_lora, fedsa_lora, fedsvd, "
                                          "fedsvd_het, ffa_lora, flexlora, flora, hetlora, lora_lego"):
        get_strategy("nope")


def test_what_travels(tmp_path):
    fedavg, ffa, fedsvd = (strategy_of(cls, tmp_path) for cls in (FedAvgLoRA, FFALoRA, FedSVD))
    assert fedavg.uplink_keys() == {A, B, HEAD} and set(fedavg.downlink(fedavg.global_arrays)) == {A, B, HEAD}
    assert ffa.uplink_keys() == {B, HEAD} and set(ffa.downlink(ffa.global_arrays)) == {B, HEAD}  # A: a seed
    assert fedsvd.uplink_keys() == {B, HEAD} and set(fedsvd.downlink(fedsvd.global_arrays)) == {A, B, HEAD}


def test_fedavg_lora_averages_every_factor_and_the_metrics_by_examples(tmp_path):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    updates = [client_update(strategy, k) for k in range(2)]
    arrays, metrics = strategy.aggregate_train(1, [reply(1, updates[0], 10, loss=1.0, epsilon=0.5),
                                                   reply(2, updates[1], 30, loss=3.0, epsilon=0.25)])
    out = from_record(arrays)
    for key in (A, B, HEAD):
        np.testing.assert_allclose(out[key], 0.25 * updates[0][key] + 0.75 * updates[1][key], rtol=1e-5, atol=1e-6)
    assert metrics["clients-trained"] == 2 and metrics["clients-refused"] == 0
    assert metrics["train-loss"] == pytest.approx(0.25 * 1.0 + 0.75 * 3.0)
    assert metrics["first-loss"] == pytest.approx(2 * (0.25 * 1.0 + 0.75 * 3.0))
    assert metrics["epsilon-max"] == pytest.approx(0.5)
    assert metrics["bytes-up"] == 2 * sum(v.nbytes for v in updates[0].values())
    assert strategy.ledgers == {"1": ledger_of(1), "2": ledger_of(2)}


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
    arrays, _ = strategy.aggregate_train(2, [reply(1, updates[0], 20), reply(2, updates[1], 60)])
    out = from_record(arrays)
    mean_b = (updates[0][B] + 3 * updates[1][B]) / 4
    expected_b, expected_a = fedsvd_reorthogonalize(mean_b, strategy.global_arrays[A])
    np.testing.assert_allclose(out[B], expected_b, atol=1e-5)
    np.testing.assert_allclose(out[A], expected_a, atol=1e-5)
    np.testing.assert_allclose(out[B] @ out[A], mean_b @ strategy.global_arrays[A], atol=1e-4)
    np.testing.assert_allclose(out[A] @ out[A].T, np.eye(RANK), atol=1e-5)
    np.testing.assert_allclose(out[HEAD], (updates[0][HEAD] + 3 * updates[1][HEAD]) / 4, atol=1e-6)


def test_refused_failed_and_malformed_replies_are_skipped(tmp_path):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    good, other = client_update(strategy, 0), client_update(strategy, 1)
    wrong_shape = {**good, B: np.zeros((D + 1, RANK), np.float32)}
    not_finite = {**good, HEAD: np.full(good[HEAD].shape, np.nan, np.float32)}
    missing_key = {k: v for k, v in good.items() if k != A}
    failed = Message(Error(code=0, reason="client crashed"), reply_to=instruction(9))
    replies = [reply(1, good, 10), reply(2, None, 0, refused=1), reply(3, wrong_shape), reply(4, not_finite),
               reply(5, missing_key), reply(6, good, examples=0), failed, reply(7, other, 30)]
    arrays, metrics = strategy.aggregate_train(4, replies)
    out = from_record(arrays)
    for key in good:
        np.testing.assert_allclose(out[key], 0.25 * good[key] + 0.75 * other[key], rtol=1e-5, atol=1e-6)
    assert metrics["clients-trained"] == 2 and metrics["clients-refused"] == 1
    assert strategy.refusals[4] == ["2"]
    assert strategy.ledgers["2"] == ledger_of(2)  # a refusing client's ledger is still recorded


def test_replies_with_broken_records_are_rejected_not_fatal(tmp_path):
    """A buggy or hostile client must not stop the server: each broken reply is skipped with a warning."""
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    good = client_update(strategy, 0)

    def broken(change):
        message = reply(3, good, 10)
        change(message.content)
        return message

    def drop_metric(name):
        return lambda c: c.__setitem__("metrics", MetricRecord({k: v for k, v in c["metrics"].items() if k != name}))

    replies = [
        broken(lambda c: c.__delitem__("metrics")),
        broken(drop_metric("train-loss")),
        broken(lambda c: c.__delitem__("privacy")),
        broken(lambda c: c["privacy"].__setitem__("ledger", "{not json")),
        broken(lambda c: c["privacy"].__setitem__("ledger", json.dumps({"history": [{"round": 1}]}))),
        broken(lambda c: c.__setitem__("arrays", to_record({k: v.astype(np.float64) for k, v in good.items()}))),
        broken(lambda c: c.__setitem__("adapter", ConfigRecord({"name": "nola"}))),
        broken(lambda c: c.__delitem__("adapter")),
        reply(1, good, 10),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-trained"] == 1
    for key in good:
        np.testing.assert_array_equal(from_record(arrays)[key], good[key])
        assert from_record(arrays)[key].dtype == np.float32


def test_no_usable_reply_leaves_the_global_adapter_unchanged(tmp_path):
    strategy = strategy_of(FedSVD, tmp_path)
    arrays, metrics = strategy.aggregate_train(3, [reply(1, None, 0, refused=1), reply(2, None, 0, refused=1)])
    assert arrays is None  # Flower keeps the previous global arrays
    assert metrics["clients-trained"] == 0 and metrics["clients-refused"] == 2
    assert strategy.refusals[3] == ["1", "2"]


@pytest.mark.parametrize("cls,a_travels", [(FFALoRA, False), (FedSVD, True), (FedAvgLoRA, True)])
def test_configure_train_samples_seeded_clients_and_sends_the_right_tensors(tmp_path, grid, cls, a_travels):
    record = to_record(global_state())

    def sampled(strategy, server_round):
        return [m.metadata.dst_node_id for m in strategy.configure_train(server_round, record, ConfigRecord({}), grid)]

    strategy = cls(clients_per_round=2, seed=7, run_dir=str(tmp_path))
    messages = list(strategy.configure_train(1, record, ConfigRecord({}), grid))
    nodes = [m.metadata.dst_node_id for m in messages]
    assert len(set(nodes)) == 2 and set(nodes) <= set(grid.get_node_ids())
    assert sampled(cls(clients_per_round=2, seed=7, run_dir=str(tmp_path)), 1) == nodes
    rounds = {tuple(sampled(strategy, r)) for r in range(1, 9)}
    assert len(rounds) > 1, "different rounds should sample different clients"
    for message in messages:
        sent = message.content["arrays"]
        assert isinstance(sent, ArrayRecord)
        assert (A in sent) is a_travels and {B, HEAD} <= set(sent)
        config = message.content["config"]
        assert config["frozen"] == ",".join(cls.frozen_factors) and config["server-round"] == 1
        assert config["run-dir"] == str(tmp_path)
    down = {k: v for k, v in global_state().items() if a_travels or k != A}
    assert strategy.last_bytes_down == 2 * sum(v.nbytes for v in down.values())
    assert len(grid.push_messages(messages)) == 2  # the SuperLink accepts them as well-formed instructions


def test_one_round_trip_through_the_grid(tmp_path, grid):
    """configure_train -> clients reply to the messages they got -> aggregate_train, for FedSVD."""
    strategy = FedSVD(clients_per_round=3, seed=1, run_dir=str(tmp_path))
    start = global_state(3)
    messages = list(strategy.configure_train(1, to_record(start), ConfigRecord({}), grid))
    updates, replies = [], []
    for k, message in enumerate(messages):
        received = from_record(message.content["arrays"])
        update = {B: received[B] + 0.1 * (k + 1), HEAD: received[HEAD] - 0.1 * (k + 1)}
        updates.append(update)
        replies.append(reply(message.metadata.dst_node_id, update, examples=k + 1, to=message))
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays)
    mean_b = (updates[0][B] + 2 * updates[1][B] + 3 * updates[2][B]) / 6
    np.testing.assert_allclose(out[B] @ out[A], mean_b @ start[A], atol=1e-5)
    np.testing.assert_allclose(out[HEAD], start[HEAD] - 0.1 * (1 + 4 + 9) / 6, atol=1e-6)
    assert metrics["clients-trained"] == 3
    assert set(strategy.ledgers) == {str(m.metadata.dst_node_id) for m in messages}
