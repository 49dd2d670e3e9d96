"""A truncated, corrupted or edited privacy ledger is refused with a clear error, never read as empty; the
client answers the server with that error instead of training, and the server logs it as a fault."""

from __future__ import annotations

import json
import logging

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.client_app import train
from common.config import RunConfig
from common.errors import LedgerError
from common.privacy import PrivacyLedger, PrivacyStep
from common.privacy.ledger import CHECKSUM_KEY, main as ledger_main
from server.strategies.fedavg_lora import FedAvgLoRA
from tests.test_strategies import strategy_of, task_identity  # noqa: F401

pytestmark = pytest.mark.faults
DELTA = 1e-5
ROUNDS = [PrivacyStep(1, 1.1, 0.02, 50), PrivacyStep(2, 0.9, 0.05, 30)]


@pytest.fixture
def path(tmp_path):
    """A ledger file of client 7 with two rounds, as the client writes it."""
    book = PrivacyLedger(tmp_path / "client-7.json", "7", 8.0, DELTA)
    for row in ROUNDS:
        book.charge(row)
    return book.path


def reopen(path):
    return PrivacyLedger(path, "7", 8.0, DELTA)


def test_an_intact_ledger_carries_a_checksum_and_reopens(path):
    assert json.loads(path.read_text())[CHECKSUM_KEY].startswith("sha256:")
    assert reopen(path).history == ROUNDS


def test_a_truncated_ledger_is_refused_at_every_length(path):
    data = path.read_bytes()
    for length in range(len(data)):  # 0 bytes (an empty file) included: never a fresh, unspent ledger
        path.write_bytes(data[:length])
        with pytest.raises(LedgerError, match=f"privacy ledger {path} .*restore it from a backup; do not delete it"):
            reopen(path)


def test_any_flipped_byte_is_refused(path):
    data = path.read_bytes()
    for offset in range(len(data)):
        path.write_bytes(data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:])
        with pytest.raises(LedgerError, match=f"privacy ledger {path} "):
            reopen(path)


def test_an_edited_value_is_refused_by_the_checksum(path):
    data = json.loads(path.read_text())
    data["history"][1]["steps"] = 3  # "spent less than it did"
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="does not match its checksum \\(corrupted or edited\\)"):
        reopen(path)


def test_a_ledger_without_checksum_is_refused_until_sealed(path, capsys):
    """Deleting the field, or a ledger from before checksums: refused, with the command that seals it."""
    data = json.loads(path.read_text())
    del data[CHECKSUM_KEY]
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=f"has no checksum.*python -m common.privacy.ledger seal {path}"):
        reopen(path)
    ledger_main(["seal", str(path)])
    assert f"sealed {path}: client 7, 2 rounds" in capsys.readouterr().out
    assert reopen(path).history == ROUNDS


def test_seal_refuses_a_ledger_with_an_invalid_history(path, capsys):
    data = json.loads(path.read_text())
    del data[CHECKSUM_KEY]
    data["history"][0]["sample_rate"] = 7.0
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as exit_info:
        ledger_main(["seal", str(path)])
    assert exit_info.value.code == 2
    assert "has an invalid history" in capsys.readouterr().err and CHECKSUM_KEY not in json.loads(path.read_text())


def test_the_client_replies_with_the_error_and_the_server_logs_it_as_a_fault(path, tmp_path, caplog):
    path.write_bytes(path.read_bytes()[:40])
    logger = logging.getLogger("fedlora.client")
    logger.addHandler(caplog.handler)
    try:
        context = Context(run_id=1, node_id=11, state=RecordDict(), run_config=RunConfig().to_flower(),
                          node_config={"partition-id": 0, "num-partitions": 2, "client-id": "7",
                                       "ledger-dir": str(path.parent)})
        msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 3, "run-dir": str(tmp_path),
                                                                  "frozen": ""}), "arrays": ArrayRecord()}),
                      dst_node_id=11, message_type=MessageType.TRAIN)
        answer = train(msg, context)
    finally:
        logger.removeHandler(caplog.handler)
    assert answer.has_error() and answer.error.reason.startswith(f"privacy ledger {path} is not valid JSON")
    [line] = [r for r in caplog.records if r.name == "fedlora.client"]
    assert line.levelname == "ERROR" and line.exc_info is None and line.getMessage() == answer.error.reason
    assert path.read_bytes() != b"" and len(path.read_bytes()) == 40  # the broken file is left for the user

    strategy = strategy_of(FedAvgLoRA, tmp_path)
    strategy.node_clients[answer.metadata.src_node_id] = "7"  # known from an earlier, readable reply
    arrays, metrics = strategy.aggregate_train(3, [answer])
    assert arrays is None and metrics["clients-rejected"] == 1
    assert answer.metadata.src_node_id == 11
    assert strategy.faults[0] == {"round": 3, "node": 11, "client": "7",
                                  "kind": "error-reply", "reason": answer.error.reason,
                                  "action": "no update from this node this round"}
