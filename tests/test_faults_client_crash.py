"""A client that crashes mid-round: its ledger counts exactly the steps that ran (each is on disk before it
runs), a re-sent round is a new row (the crashed execution's steps stay counted), and a client killed
and restarted keeps refusing once its budget is spent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from opacus.optimizers.optimizer import DPOptimizer

from client.train_round import ClientIdentity, train_round
from common.config import RunConfig
from common.privacy import PrivacyLedger, PrivacyStep, epsilon_of
from tests.conftest import REPO, write_toy_csv

pytestmark = pytest.mark.faults
DELTA = 1e-5
STEP = PrivacyStep(4, 1.1, 0.05, 5)


class Crash(Exception):
    """Stands in for the process dying at that point."""


def ledger(tmp_path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "client-7.json", "7", 100.0, DELTA)


def test_each_step_is_on_disk_before_it_runs(tmp_path):
    book = ledger(tmp_path)
    book.open_round(STEP)
    assert ledger(tmp_path).history == []  # nothing ran yet: no row, and no file
    for j in range(1, 4):
        book.count_step()
        assert ledger(tmp_path).history == [PrivacyStep(4, 1.1, 0.05, j)]  # what a crash now would leave


def test_a_resent_round_is_a_new_row_and_the_crashed_steps_stay_counted(tmp_path):
    crashed = ledger(tmp_path)
    crashed.open_round(STEP)
    for _ in range(2):
        crashed.count_step()
    del crashed  # the process dies after 2 of 5 steps
    restarted = ledger(tmp_path)
    restarted.open_round(STEP)  # the server sends round 4 again
    for _ in range(5):
        restarted.count_step()
    restarted.close_round(5)
    rows = [PrivacyStep(4, 1.1, 0.05, 2), PrivacyStep(4, 1.1, 0.05, 5)]
    assert ledger(tmp_path).history == rows
    assert ledger(tmp_path).epsilon() == epsilon_of([PrivacyStep(4, 1.1, 0.05, 7)], DELTA)


def test_counting_never_exceeds_the_budget_check_and_never_misses_a_step(tmp_path):
    book = ledger(tmp_path)
    with pytest.raises(ValueError, match="count_step without open_round"):
        book.count_step()
    book.open_round(PrivacyStep(1, 1.1, 0.05, 2))
    book.count_step()
    with pytest.raises(ValueError, match="took 2 steps but the ledger counted 1: a step ran uncounted"):
        book.close_round(2)
    book.count_step()
    with pytest.raises(ValueError, match="more than the 2 steps its budget check allowed"):
        book.count_step()
    with pytest.raises(ValueError, match="round 2 would reach epsilon"):
        PrivacyLedger(tmp_path / "client-8.json", "8", 0.5, DELTA).open_round(PrivacyStep(2, 0.5, 0.5, 50))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = write_toy_csv(tmp_path_factory.mktemp("data"))
    return RunConfig(dataset=str(path), examples_per_class=0, num_rounds=2, local_steps=3, batch_size=8,
                     max_seq_len=16, target_epsilon=4.0, rank=4, strategy="fedsvd")


NOTHING_RECEIVED: dict = {}  # the client trains its own seeded init: enough for the ledger, one model load less


def identity(tmp_path) -> ClientIdentity:
    return ClientIdentity(client_id="0", partition_id=0, num_partitions=2, ledger_dir=tmp_path)


def history(tmp_path) -> list[dict]:
    return json.loads((tmp_path / "client-0.json").read_text())["history"]


def crash_on_call(monkeypatch, owner, name: str, call: int) -> None:
    """Make `owner.name` raise Crash on its `call`-th call (the calls before it run normally)."""
    original, calls = getattr(owner, name), []

    def crashing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Crash(f"{name} call {call}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, crashing)


def test_a_restarted_client_has_exactly_the_steps_taken_and_keeps_refusing(config, tmp_path, monkeypatch):
    """Planned: 2 rounds of 3 steps. Round 1 trains; round 2 dies after step 1, before step 2 begins. The
    restarted client (a new PrivacyLedger read from disk, as a new process opens it) has 3 + 1 steps spent, so
    a second execution of round 2 (3 more) would exceed the budget: it refuses rounds 2 and 3, writing nothing.
    test_a_sigkilled_client_... (slow) does the same with a real SIGKILL."""
    assert not train_round(config, identity(tmp_path), NOTHING_RECEIVED, ("lora_A",), server_round=1).refused
    with monkeypatch.context() as patch:
        crash_on_call(patch, PrivacyLedger, "count_step", call=2)
        with pytest.raises(Crash):
            train_round(config, identity(tmp_path), NOTHING_RECEIVED, ("lora_A",), server_round=2)
    assert_restarted_client_refuses(config, tmp_path)


def assert_restarted_client_refuses(config, tmp_path) -> None:
    assert [(row["round"], row["steps"]) for row in history(tmp_path)] == [(1, 3), (2, 1)]
    on_disk = (tmp_path / "client-0.json").read_bytes()
    for server_round in (2, 3):  # the server re-sends round 2 (it never got a reply), then sends round 3
        outcome = train_round(config, identity(tmp_path), NOTHING_RECEIVED, ("lora_A",), server_round=server_round)
        assert outcome.refused and f"budget: round {server_round} would spend epsilon" in outcome.reason
        assert [(row["round"], row["steps"]) for row in outcome.ledger["history"]] == [(1, 3), (2, 1)]
    assert (tmp_path / "client-0.json").read_bytes() == on_disk


def test_a_crash_inside_a_step_counts_that_step(config, tmp_path, monkeypatch):
    """Step 3 drew its batch and computed its gradients, then died while adding noise: it counts."""
    crash_on_call(monkeypatch, DPOptimizer, "add_noise", call=3)
    with pytest.raises(Crash):
        train_round(config, identity(tmp_path), NOTHING_RECEIVED, ("lora_A",), server_round=1)
    assert [row["steps"] for row in history(tmp_path)] == [3]


KILLED_MID_ROUND = """
import os, signal
from math import inf  # the repr of an infinite setting (user-target-epsilon)
from pathlib import Path
from client.train_round import ClientIdentity, train_round
from common.config import RunConfig
from common.privacy import PrivacyLedger

config, client = RunConfig(**{config!r}), ClientIdentity("0", 0, 2, Path({ledger_dir!r}))
assert not train_round(config, client, {{}}, ("lora_A",), server_round=1).refused
count, calls = PrivacyLedger.count_step, []
def count_then_die(self):
    calls.append(1)
    if len(calls) == 2:  # round 2's step 1 ran and was counted; killed before its step 2 is counted
        os.kill(os.getpid(), signal.SIGKILL)
    count(self)
PrivacyLedger.count_step = count_then_die
train_round(config, client, {{}}, ("lora_A",), server_round=2)
"""


@pytest.mark.slow
def test_a_sigkilled_client_restarts_with_its_ledger_and_keeps_refusing(config, tmp_path):
    """As above, in a real client process killed with SIGKILL after step 1 of round 2 (no cleanup runs)."""
    script = KILLED_MID_ROUND.format(config=dict(vars(config)), ledger_dir=str(tmp_path))
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert_restarted_client_refuses(config, tmp_path)
