"""What a SuperNode's node-config changes on the client: its id, its ledger path, its own data file, its rank."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict

from client.client_app import identity_of, node_run_config
from common.data.partition import client_data
from tests.conftest import write_toy_csv


def context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=run_config or {})


def test_client_id_defaults_to_the_partition_id_and_can_be_named(tmp_path):
    plain = identity_of(context({"partition-id": 3, "num-partitions": 4}), str(tmp_path))
    assert (plain.client_id, plain.partition_id, plain.num_partitions) == ("3", 3, 4)
    assert plain.ledger_path == tmp_path / "ledgers" / "client-3.json"
    named = identity_of(context({"client-id": "hospital-a", "ledger-dir": str(tmp_path / "own")}), str(tmp_path))
    assert named.client_id == "hospital-a" and named.ledger_path == tmp_path / "own" / "client-hospital-a.json"


def test_a_node_config_dataset_replaces_the_run_configs(tmp_path):
    """Each organisation's SuperNode reads its own file; the run config's path is never opened there."""
    own = write_toy_csv(tmp_path)
    config = node_run_config(context({"dataset": str(own)}, {"dataset": "/nonexistent/shared.csv",
                                                            "examples-per-class": 0}))
    assert Path(config.dataset) == own
    data = client_data(config, 0, 1)
    assert len(data.train) + len(data.test) > 0
    assert node_run_config(context({}, {"dataset": "/x.csv"})).dataset == "/x.csv"
