"""Unlearning as a Flower run (server/unlearn_federated.py): the real ServerApp `run()` and the real ClientApp
functions, in process, on the real MiniLM and a toy data file.

Fast: the unlearning run keeps the finished run's settings; a missing participant is named. Slow: a
3-client DP run with stored contributions, then the exact route (a replay re-trained by the two others over
Flower, charged to their ledgers, the leaving node never asked) and LoKU (only the leaving node trains).
"""

from __future__ import annotations

import json

import pytest

from common.config import RunConfig
from common.errors import FedloraError
from server.unlearn_federated import client_nodes, unlearning_config
from tests.conftest import write_toy_csv
from tests.federation import InProcessFederation, run_server, server_identity


def test_an_unlearning_run_keeps_the_finished_runs_settings_but_its_own_unlearning_ones():
    finished = RunConfig(strategy="ffa_lora", rank=4, lr=0.02, loku_steps=10, target_epsilon=3.0)
    asked = RunConfig(unlearn_client="2", unlearn_route="loku", loku_steps=3, loku_lr=0.05, unlearn_epsilon=0.5)
    config = unlearning_config(finished, asked)
    assert (config.strategy, config.rank, config.lr, config.target_epsilon) == ("ffa_lora", 4, 0.02, 3.0)
    assert (config.unlearn_client, config.unlearn_route, config.loku_steps, config.loku_lr,
            config.unlearn_epsilon) == ("2", "loku", 3, 0.05, 0.5)


def test_clients_are_found_by_asking_the_nodes_and_a_missing_one_is_named():
    grid = InProcessFederation(RunConfig().to_flower(), num_nodes=3, partitions=[0, 2])
    with server_identity():
        assert client_nodes(grid, {"2", "0"}) == {"0": 11, "2": 12}
        with pytest.raises(FedloraError, match=r"client\(s\) 1 not connected .*connected: 0, 2"):
            client_nodes(grid, {"0", "1"}, wait=0.0)


def run_config(tmp_path, **settings) -> dict:
    data = write_toy_csv(tmp_path)
    return RunConfig(**{**dict(dataset=str(data), examples_per_class=0, num_rounds=2, clients_per_round=3,
                               local_steps=2, batch_size=8, max_seq_len=16, target_epsilon=8.0, delta=1e-3, rank=4,
                               noise_multiplier=1.0,  # a fixed noise leaves budget for the replay and LoKU
                               strategy="fedavg_lora", partitioner="iid", store_contributions=True,
                               run_dir=str(tmp_path / "run")), **settings}).to_flower()


def ledger_rounds(run_dir, client: str) -> list[int]:
    history = json.loads((run_dir / "ledgers" / f"client-{client}.json").read_text())["history"]
    return [int(row["round"]) for row in history]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("forget")
    config = run_config(tmp_path)
    run_dir = run_server(InProcessFederation(config, num_nodes=3), config)
    return run_dir, config


@pytest.mark.slow  # a DP run of 3 clients x 2 rounds on MiniLM, then its replay over Flower
def test_the_exact_route_replays_the_rounds_on_the_other_clients_over_flower(finished_run):
    run_dir, config = finished_run
    before = {c: ledger_rounds(run_dir, c) for c in "012"}
    assert before["0"] == before["1"] == before["2"] == [1, 2]
    grid = InProcessFederation({**config, "unlearn-client": "2"}, num_nodes=3)
    out = run_server(grid, {**config, "unlearn-client": "2"})
    record = json.loads((out / "record.json").read_text())
    assert (record["route"], record["exact"], record["replayed_rounds"], record["via"]) == ("replay", True, [1, 2],
                                                                                           "flower")
    assert (out / "adapter.safetensors").is_file() and 0.0 <= record["global-accuracy"] <= 1.0
    trained = [node for kind, node in grid.sent if kind == "train"]
    assert sorted(trained) == [11, 11, 12, 12]  # clients 0 and 1, both rounds; client 2's node (13) never trains
    assert ledger_rounds(run_dir, "0") == ledger_rounds(run_dir, "1") == [1, 2, 1, 2]  # the replay is charged
    assert ledger_rounds(run_dir, "2") == [1, 2]
    assert sorted(record["ledgers"]) == ["0", "1"]


@pytest.mark.slow
def test_the_loku_route_trains_only_the_leaving_client_and_charges_its_ledger(finished_run):
    run_dir, config = finished_run
    settings = {**config, "unlearn-client": "1", "unlearn-route": "loku", "loku-steps": 2}
    grid = InProcessFederation(settings, num_nodes=3)
    out = run_server(grid, settings)
    record = json.loads((out / "record.json").read_text())
    assert record["route"] == "approximate-loku" and not record["exact"] and record["via"] == "flower"
    assert [entry for entry in grid.sent if entry[0] != "query"] == [("train.loku", 12)]
    assert record["loku"]["steps"] == 2 and 0 < record["loku"]["epsilon"] <= 8.0 + 1.0
    assert ledger_rounds(run_dir, "1")[-2:] == [3, 3]  # LoKU's Fisher step and its training, round R + 1
    assert (out / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_an_exact_replay_without_a_participants_node_writes_nothing(finished_run, monkeypatch):
    import server.unlearn_federated as federated

    run_dir, config = finished_run
    monkeypatch.setattr(federated, "NODE_WAIT_SECONDS", 0.0)
    settings = {**config, "unlearn-client": "0"}
    grid = InProcessFederation(settings, num_nodes=3, partitions=[0, 2])  # client 1's node is not connected
    with pytest.raises(FedloraError, match=r"client\(s\) 1 not connected"):
        run_server(grid, settings)
    assert not (run_dir / "unlearn" / "client-0").exists()
