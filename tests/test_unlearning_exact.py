"""Exact unlearning (server/unlearn.py) on the stored history (server/contributions.py), in process.

The strategies run on real Flower reply messages; each client's "training" is a fixed nonlinear function of
the global it receives, so a round's payload depends on the global like a real round with DP off and fixed
seeds (DP noise is seeded from the OS: exact equality is only testable with DP off).
"""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError
from common.payload import from_record
from server.contributions import load_history, with_stored_contributions
from server.strategies.fedavg_lora import FedAvgLoRA
from server.strategies.fedsvd import FedSVD
from server.strategies.hetlora import HetLoRA
from server.unlearn import exact_unlearn
from tests.test_strategies import global_state, reply, task_identity  # noqa: F401  (autouse fixture)

EXAMPLES = {"0": 30, "1": 50, "2": 20}


def local_training(strategy, client: str, arrays: dict, server_round: int) -> tuple[dict, float]:
    """A deterministic stand-in for a DP-off round: the payload is a nonlinear function of the global."""
    shift = 0.1 * (int(client) + 1) + 0.01 * server_round
    strategy.global_arrays = arrays  # what configure_train sets before a round
    payload = {k: np.tanh(arrays[k] + shift).astype(np.float32) for k in strategy.uplink_keys()}
    return payload, float(EXAMPLES[client])


def run(cls, tmp_path, participation: dict[int, list[str]], store: bool) -> tuple[object, dict]:
    """Rounds 1..R in process; `participation[r]` = the clients whose replies reach round r."""
    strategy = (with_stored_contributions(cls) if store else cls)(clients_per_round=1, seed=7, run_dir=str(tmp_path))
    arrays = global_state()
    for rnd in sorted(participation):
        strategy.global_arrays = arrays
        strategy.last_bytes_down = 0
        replies = [reply(int(c), local_training(strategy, c, arrays, rnd)[0], examples=EXAMPLES[c])
                   for c in participation[rnd]]
        record, _ = strategy.aggregate_train(rnd, replies)
        arrays = from_record(record) if record is not None else arrays
    return strategy, arrays


@pytest.mark.parametrize("cls", [FedAvgLoRA, FedSVD])
def test_replay_equals_training_without_the_client(cls, tmp_path):
    everyone = {r: ["0", "1", "2"] for r in (1, 2, 3)}
    stored, _ = run(cls, tmp_path / "with", everyone, store=True)
    _, without = run(cls, tmp_path / "without", {r: ["0", "1"] for r in (1, 2, 3)}, store=False)
    history = load_history(tmp_path / "with")
    plain = cls(clients_per_round=1, seed=7, run_dir=str(tmp_path))

    waiting = exact_unlearn(history, "2", plain)
    assert waiting.route == "replay" and not waiting.exact and waiting.arrays is None
    assert waiting.first_round == 1 and waiting.replayed_rounds == [1, 2, 3]
    assert all(np.array_equal(waiting.start[k], v) for k, v in global_state().items())

    done = exact_unlearn(history, "2", plain, retrain=lambda cs, g, r: [local_training(plain, c, g, r) for c in cs])
    assert done.route == "replay" and done.exact
    for key, value in without.items():
        np.testing.assert_allclose(done.arrays[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [FedAvgLoRA, FedSVD])
def test_a_client_of_the_last_round_only_is_reaggregated_exactly(cls, tmp_path):
    joined_late = {1: ["0", "1"], 2: ["0", "1"], 3: ["0", "1", "2"]}
    _, with_it = run(cls, tmp_path / "with", joined_late, store=True)
    _, without = run(cls, tmp_path / "without", {r: ["0", "1"] for r in (1, 2, 3)}, store=False)
    result = exact_unlearn(load_history(tmp_path / "with"), "2", cls(clients_per_round=1, seed=7, run_dir="."))
    assert result.route == "reaggregate-last-round" and result.exact and result.first_round == 3
    assert any(not np.allclose(with_it[k], without[k]) for k in without)  # it did change the global
    for key, value in without.items():
        np.testing.assert_allclose(result.arrays[key], value, rtol=1e-6, atol=1e-6)


def test_history_records_every_round_and_its_disk_cost(tmp_path):
    strategy, final = run(FedAvgLoRA, tmp_path, {1: ["0", "1"], 2: ["1"]}, store=True)
    history = load_history(tmp_path)
    assert [c.round for c in history] == [1, 2] and history[0].clients == ["0", "1"] and history[0].weights == [30, 50]
    summary = strategy.contribution_summary()
    adapter_bytes = sum(v.nbytes for v in global_state().values())
    assert set(summary["bytes-per-round"]) == {"1", "2"}
    assert summary["bytes-per-round"]["1"] > 3 * adapter_bytes  # the global before the round + two payloads
    assert summary["total-bytes"] == sum(summary["bytes-per-round"].values())
    result = exact_unlearn(history, "7", FedAvgLoRA(clients_per_round=1, seed=7, run_dir="."))
    assert result.route == "not-a-contributor"
    assert all(np.allclose(result.arrays[k], v) for k, v in final.items())


def test_refusal_without_the_stored_history(tmp_path):
    with pytest.raises(ConfigError, match="store-contributions = true"):
        load_history(tmp_path)


def test_history_with_a_gap_is_refused(tmp_path):
    run(FedAvgLoRA, tmp_path, {1: ["0"], 2: ["0"], 3: ["0"]}, store=True)
    for suffix in (".json", ".safetensors"):
        (tmp_path / "contributions" / f"round-0002{suffix}").unlink()
    with pytest.raises(ConfigError, match="lacks rounds 2"):
        load_history(tmp_path)


def test_only_linear_strategies_store_contributions():
    with pytest.raises(ConfigError, match="needs a linear strategy"):
        with_stored_contributions(HetLoRA)
