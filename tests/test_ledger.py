"""The privacy ledger: composition across rounds and restarts, exact refusal, honest settling."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from client.train_round import noise_for
from common.config import RunConfig
from common.privacy import (
    PrivacyLedger,
    PrivacyStep,
    calibrate_noise_multiplier,
    epsilon_curve,
    epsilon_of,
    poisson_sample_rate,
)
from tests.conftest import REPO

DELTA = 1e-5
ROUNDS = [PrivacyStep(1, 1.1, 0.02, 50), PrivacyStep(2, 0.9, 0.05, 30), PrivacyStep(3, 1.3, 0.02, 80)]


def opacus_reference(rows: list[PrivacyStep], accountant_class=RDPAccountant) -> float:
    """Opacus' own accountant fed step by step, the way a single long-lived PrivacyEngine would be."""
    accountant = accountant_class()
    for row in rows:
        for _ in range(row.steps):
            accountant.step(noise_multiplier=row.noise_multiplier, sample_rate=row.sample_rate)
    return accountant.get_epsilon(delta=DELTA)


def ledger(tmp_path, target=100.0, **kwargs) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "client-7.json", "7", target, DELTA, **kwargs)


def test_epsilon_of_three_rounds_equals_opacus_accountant():
    assert epsilon_of(ROUNDS, DELTA) == pytest.approx(opacus_reference(ROUNDS), rel=1e-9)
    assert epsilon_of(ROUNDS, DELTA, "prv") == pytest.approx(opacus_reference(ROUNDS, PRVAccountant), rel=1e-3)
    assert epsilon_of([], DELTA) == 0.0
    assert epsilon_of([PrivacyStep(1, 0.0, 0.1, 5)], DELTA) == math.inf


def test_epsilon_curve_is_cumulative_and_increasing():
    curve = epsilon_curve(ROUNDS, DELTA)
    assert curve == [pytest.approx(opacus_reference(ROUNDS[: i + 1])) for i in range(3)]
    assert curve[0] < curve[1] < curve[2]


def test_ledger_composes_across_rounds_and_process_restarts(tmp_path):
    first = ledger(tmp_path)
    first.charge(ROUNDS[0])
    first.charge(ROUNDS[1])
    # A new process (a restarted SuperNode) opens the same file and spends its third round there.
    script = (
        "from common.privacy import PrivacyLedger, PrivacyStep\n"
        f"l = PrivacyLedger({str(tmp_path / 'client-7.json')!r}, '7', 100.0, {DELTA})\n"
        "assert len(l.history) == 2, l.history\n"
        "l.charge(PrivacyStep(3, 1.3, 0.02, 80))\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True)
    reopened = ledger(tmp_path)
    assert reopened.history == ROUNDS
    assert reopened.epsilon() == pytest.approx(opacus_reference(ROUNDS), rel=1e-9)


def test_refusal_happens_exactly_at_the_round_after_the_plan(tmp_path):
    """Noise calibrated for 3 rounds of 20 steps: rounds 1-3 fit the budget, round 4 is refused."""
    target, rate, steps, planned = 3.0, poisson_sample_rate(900, 64), 20, 3
    sigma = calibrate_noise_multiplier(target, DELTA, rate, steps * planned)
    book = ledger(tmp_path, target=target)
    for round_number in range(1, planned + 1):
        step = PrivacyStep(round_number, sigma, rate, steps)
        assert book.allows(step)
        book.charge(step)
    assert book.epsilon() <= target
    assert book.epsilon() > 0.95 * target  # calibration spends (nearly) the whole budget, not a fraction
    fourth = PrivacyStep(planned + 1, sigma, rate, steps)
    assert not book.allows(fourth)
    with pytest.raises(ValueError, match="round 4 would reach epsilon"):
        book.charge(fourth)
    assert len(ledger(tmp_path, target=target).history) == planned  # the refused round left no trace


def test_settle_records_the_steps_actually_taken(tmp_path):
    book = ledger(tmp_path)
    book.charge(PrivacyStep(1, 1.0, 0.1, 10))
    book.settle(1, 6)
    assert ledger(tmp_path).history == [PrivacyStep(1, 1.0, 0.1, 6)]
    with pytest.raises(ValueError, match="more than charged"):
        book.settle(1, 7)
    with pytest.raises(KeyError):
        book.settle(2, 1)


def test_a_ledger_cannot_be_reused_at_another_delta_or_by_another_client(tmp_path):
    ledger(tmp_path).charge(ROUNDS[0])
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(tmp_path / "client-7.json", "7", 100.0, 1e-6)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(tmp_path / "client-7.json", "7", 100.0, DELTA, accountant="prv")
    with pytest.raises(ValueError, match="belongs to client 7"):
        PrivacyLedger(tmp_path / "client-7.json", "8", 100.0, DELTA)


def test_writes_are_atomic_json_with_no_temporary_files_left(tmp_path):
    book = ledger(tmp_path)
    for row in ROUNDS:
        book.charge(row)
    assert [p.name for p in tmp_path.iterdir()] == ["client-7.json"]
    data = json.loads((tmp_path / "client-7.json").read_text())
    assert data["delta"] == DELTA and data["accountant"] == "rdp" and len(data["history"]) == 3


def test_noise_for_calibrates_to_the_planned_participation():
    config = RunConfig(num_rounds=4, local_steps=10, target_epsilon=2.0, planned_participation=0.5)
    rate = poisson_sample_rate(500, config.batch_size)
    sigma = noise_for(config, rate)
    assert config.planned_rounds == 2
    assert epsilon_of([PrivacyStep(r, sigma, rate, 10) for r in (1, 2)], DELTA) == pytest.approx(2.0, abs=0.02)
    assert noise_for(RunConfig(noise_multiplier=1.7), rate) == 1.7  # given, not calibrated
    assert noise_for(RunConfig(target_epsilon=math.inf), rate) is None  # the non-private reference run
