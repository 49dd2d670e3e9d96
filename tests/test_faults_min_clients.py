"""Clients that fail mid-round: the round aggregates the replies it has if at least `min-train-clients` are
valid; otherwise it is skipped with a log line and the global state is unchanged."""

from __future__ import annotations


import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message

from common.config import RunConfig
from common.errors import ConfigError
from common.payload import from_record, to_record
from server.strategies.fedavg_lora import FedAvgLoRA
from tests.test_strategies import client_update, global_state, grid, reply, task_identity  # noqa: F401

pytestmark = pytest.mark.faults



def started_round(tmp_path, grid, min_train_clients: int):  # noqa: F811
    """A FedAvg-LoRA round configured for 3 of the grid's nodes: (strategy, the instructions it sent)."""
    strategy = FedAvgLoRA(clients_per_round=3, seed=7, run_dir=str(tmp_path), min_train_clients=min_train_clients)
    messages = list(strategy.configure_train(1, to_record(global_state()), ConfigRecord({}), grid))
    return strategy, messages


def test_the_round_aggregates_the_replies_it_has(tmp_path, grid, server_log):  # noqa: F811
    strategy, sent = started_round(tmp_path, grid, min_train_clients=2)
    first, crashed, second = sent
    updates = [client_update(strategy, k) for k in range(2)]
    arrays, metrics = strategy.aggregate_train(1, [
        reply(first.metadata.dst_node_id, updates[0], 10, to=first),
        Message(Error(code=2, reason="out of memory"), reply_to=crashed),
        reply(second.metadata.dst_node_id, updates[1], 30, to=second)])
    out = from_record(arrays)
    for key in updates[0]:
        np.testing.assert_allclose(out[key], 0.25 * updates[0][key] + 0.75 * updates[1][key], rtol=1e-6, atol=1e-7)
    assert metrics["clients-trained"] == 2 and metrics["clients-rejected"] == 1
    crashed_node = crashed.metadata.dst_node_id
    assert strategy.faults == [{"round": 1, "node": crashed_node, "client": None, "kind": "error-reply",
                                "reason": "out of memory", "action": "no update from this node this round"}]
    assert f"round 1: node {crashed_node} failed: out of memory" in [r.getMessage() for r in server_log.records]


def test_too_few_replies_skip_the_round_and_say_so(tmp_path, grid, server_log):  # noqa: F811
    strategy, sent = started_round(tmp_path, grid, min_train_clients=2)
    first, silent_1, silent_2 = sent
    valid = client_update(strategy, 0)
    arrays, metrics = strategy.aggregate_train(1, [reply(first.metadata.dst_node_id, valid, 10, to=first)])
    assert arrays is None  # Flower keeps the previous global arrays
    assert metrics["clients-trained"] == 0 and metrics["round-skipped"] == 1 and metrics["clients-rejected"] == 2
    assert "round 1: only 1 valid replies, fewer than min-train-clients = 2; round skipped, the global adapter is " \
           "unchanged" in [r.getMessage() for r in server_log.records]
    assert [(f["node"], f["kind"]) for f in strategy.faults] == [
        (silent_1.metadata.dst_node_id, "no-reply"), (silent_2.metadata.dst_node_id, "no-reply"),
        (None, "round-skipped")]
    assert strategy.faults[-1]["reason"] == "1 valid replies, min-train-clients = 2"
    assert strategy.client_adapters == {}  # nothing of the skipped round is kept


def test_min_train_clients_is_validated_against_clients_per_round():
    assert RunConfig.from_flower({"min-train-clients": 2, "clients-per-round": 3}).min_train_clients == 2
    with pytest.raises(ConfigError, match="min-train-clients = 5 > clients-per-round = 4: no round could ever"):
        RunConfig.from_flower({"min-train-clients": 5})
    with pytest.raises(ConfigError, match="min-train-clients = 0 is invalid"):
        RunConfig.from_flower({"min-train-clients": 0})
