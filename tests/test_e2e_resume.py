"""End to end: a real `flwr run` simulation (2 clients, 3 rounds) whose SuperLink, and with it the ServerApp
and the clients, is killed once round 1's checkpoint is on disk; `flwr run` again on the same run dir resumes
at round 2. Its privacy report has the history rows of an uninterrupted run: no step lost, none counted
twice. (The DP noise is seeded from the OS, so the two runs' adapters differ; the strategy-level equality of
resumed and uninterrupted arrays is tests/test_faults_resume.py.)"""

from __future__ import annotations

import json

import pytest

from simulations.flower_sim import flwr_run, simulation_superlink
from tests.conftest import write_toy_csv

pytestmark = [pytest.mark.slow, pytest.mark.faults]
RUN_SECONDS = 240
# A fixed noise multiplier and a budget with room: a client that had begun round 2 before the kill trains it
# again after the restart (both executions are counted) and must not then be refused round 3.
TINY = {"num-rounds": 3, "clients-per-round": 2, "local-steps": 2, "batch-size": 8, "max-seq-len": 16,
        "examples-per-class": 0, "partitioner": "iid", "strategy": "fedsvd", "noise-multiplier": 1.0,
        "target-epsilon": 50.0, "eval-batch-size": 32}


def checkpoint_round(run_dir) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return 0


def histories(ledger_dir) -> dict[str, list[dict]]:
    return {p.stem: json.loads(p.read_text())["history"] for p in sorted(ledger_dir.glob("client-*.json"))}


def test_a_killed_simulation_resumes_with_the_history_of_an_uninterrupted_run(tmp_path):
    settings = {**TINY, "dataset": str(write_toy_csv(tmp_path / "data"))}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    with simulation_superlink() as env:
        assert flwr_run(env, {**settings, "run-dir": str(straight)}, 2, timeout=RUN_SECONDS) == 0
    with simulation_superlink() as env:  # leaving this block kills the SuperLink, its simulation and ServerApp
        killed = flwr_run(env, {**settings, "run-dir": str(crashed)}, 2, timeout=RUN_SECONDS,
                          until=lambda: checkpoint_round(crashed) >= 1)
    assert killed is None and checkpoint_round(crashed) == 1 and not (crashed / "privacy.json").exists()
    at_kill = histories(crashed / "ledgers")
    with simulation_superlink() as env:
        assert flwr_run(env, {**settings, "run-dir": str(crashed)}, 2, timeout=RUN_SECONDS) == 0

    expected = {c["id"]: c["history"] for c in json.loads((straight / "privacy.json").read_text())["clients"]}
    report = json.loads((crashed / "privacy.json").read_text())
    resumed = {c["id"]: c["history"] for c in report["clients"]}
    assert set(resumed) == set(expected) == {"0", "1"}
    for client, rows in expected.items():
        assert [row["round"] for row in rows] == [1, 2, 3] and all(row["steps"] == 2 for row in rows)
        before = at_kill[f"client-{client}"]
        assert before[0] == rows[0]  # round 1, as trained before the kill
        # Rows of round 2 already on disk at the kill are executions the kill interrupted: their steps ran,
        # so they stay, as their own rows. Usually there are none (the kill comes before any step of round 2).
        interrupted = before[1:]
        assert all(row["round"] == 2 for row in interrupted)
        assert resumed[client] == [rows[0], *interrupted, *rows[1:]], (client, interrupted)
    assert [f["kind"] for f in report["faults"]] == ["server-restart"]
    rounds = json.loads((crashed / "metrics.json").read_text())["rounds"]
    assert [row["round"] for row in rounds] == [0, 1, 2, 3]
    assert all("global-accuracy" in row for row in rounds) and all(row["clients-trained"] == 2 for row in rounds[1:])
