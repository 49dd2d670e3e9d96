"""A reply whose ledger lacks a round the client trained is rejected, and the longer ledger seen before is
what the report keeps: a reset or trimmed ledger cannot make a client's epsilon look smaller."""

from __future__ import annotations

import json

import pytest

from server.strategies.fedavg_lora import FedAvgLoRA
from tests.test_strategies import client_update, ledger_of, reply, strategy_of, task_identity  # noqa: F401

pytestmark = pytest.mark.faults


def with_ledger(message, ledger):
    message.content["privacy"]["ledger"] = json.dumps(ledger)
    return message


def test_a_ledger_without_the_current_round_is_rejected(tmp_path, server_log):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    good, stale = client_update(strategy, 0), client_update(strategy, 1)
    arrays, metrics = strategy.aggregate_train(3, [reply(1, good), with_ledger(reply(2, stale), ledger_of(2, rounds=2))])
    assert metrics["clients-trained"] == 1 and metrics["clients-rejected"] == 1
    assert ("round 3: rejected reply of client 2: its ledger has no row for round(s) 3 it trained: its epsilon "
            "would be under-stated") in [r.getMessage() for r in server_log.records]
    assert strategy.trained_rounds == {"1": [3]} and "2" not in strategy.ledgers
    assert strategy.faults[-1]["kind"] == "malformed-reply" and strategy.faults[-1]["client"] == "2"


def test_a_ledger_that_lost_earlier_rounds_keeps_the_longer_one_in_the_report(tmp_path, server_log):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    strategy.aggregate_train(1, [reply(1, client_update(strategy, 0)), reply(2, client_update(strategy, 1))])
    strategy.aggregate_train(2, [reply(1, client_update(strategy, 2)), reply(2, client_update(strategy, 3))])
    assert strategy.trained_rounds == {"1": [1, 2], "2": [1, 2]}
    reset = {"client_id": "2", "history": [{"round": 3, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2}]}
    _, metrics = strategy.aggregate_train(3, [reply(1, client_update(strategy, 4)),
                                              with_ledger(reply(2, client_update(strategy, 5)), reset)])
    assert metrics["clients-trained"] == 1
    assert "its ledger has no row for round(s) 1, 2 it trained" in server_log.text
    assert strategy.ledgers["2"] == ledger_of(2)  # the longer ledger from round 2, not the reset one
    refusal = with_ledger(reply(2, None, refused=1), reset)  # a refusal with a trimmed ledger is rejected too
    strategy.aggregate_train(4, [reply(1, client_update(strategy, 6)), refusal])
    assert "round 4: rejected reply of client 2: its ledger has no row for round(s) 1, 2" in server_log.text
    assert strategy.ledgers["2"] == ledger_of(2)


def test_a_client_without_dp_has_no_rows_to_keep(tmp_path):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    plain = {"client_id": "1", "target_epsilon": float("inf"), "history": []}
    _, metrics = strategy.aggregate_train(1, [with_ledger(reply(1, client_update(strategy, 0)), plain),
                                              reply(2, client_update(strategy, 1))])
    assert metrics["clients-trained"] == 2
