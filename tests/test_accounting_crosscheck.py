"""fedlora's epsilons recomputed by an independent library (Google's dp-accounting), and calibration checked.

RDP (Opacus) is compared with dp-accounting's RDP accountant and PRV (Opacus) with its PLD accountant,
on histories shaped like real multi-round ledgers: a row of Poisson-sampled Gaussian steps per round,
composed. Tolerances, and why the libraries cannot agree exactly:

- RDP, relative 1%: both minimise the same RDP-to-(eps, delta) conversion over a finite grid of orders,
  but dp-accounting drops the fractional orders (1.1 ... 1.7) whose series it cannot converge at these
  sample rates, so its epsilon can be slightly larger. Measured: at most 0.43% apart (q = 0.2, delta 1e-3),
  below 0.03% at delta 1e-5.
- PRV vs PLD, absolute 0.02: Opacus' PRV returns the upper end of its estimate, `eps_error` = 0.01 above
  it; the PLD is discretized pessimistically (interval 1e-3, well below 0.1% here). Measured: PRV is
  0.010 to 0.011 above PLD on every history.

Both are far tighter than what a real bug changes: `test_a_bug_in_the_history_would_fail_the_check`
shows that one round too few or too many, or a doubled sample rate, breaks agreement.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from absl import logging as absl_logging
from dp_accounting import pld, rdp

from common.privacy import PrivacyStep, calibrate_noise_multiplier, epsilon_of, poisson_sample_rate

absl_logging.set_verbosity(absl_logging.ERROR)  # dp-accounting logs each fractional order it drops
# Opacus' PRV takes log(1 - q), harmlessly -inf for the full-batch history (q = 1).
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

RDP_RELATIVE_TOLERANCE = 0.01
PRV_ABSOLUTE_TOLERANCE = 0.02
PLD_DISCRETIZATION = 1e-3

# The fedlora default: n = 300 training examples at batch 64 (q = 1/5), 10 steps x 3 rounds, target 8.
DEFAULT_RATE = poisson_sample_rate(300, 64)
DEFAULT_TARGET, DEFAULT_DELTA, DEFAULT_ROUNDS, DEFAULT_STEPS = 8.0, 1e-5, 3, 10


def rounds(noise: float, rate: float, steps: int = DEFAULT_STEPS, count: int = DEFAULT_ROUNDS,
           first: int = 1) -> list[PrivacyStep]:
    return [PrivacyStep(first + i, noise, rate, steps) for i in range(count)]


def default_history(accountant: str) -> list[PrivacyStep]:
    """What a default client's ledger holds after 3 rounds: its calibrated noise, 10 steps a round."""
    noise = calibrate_noise_multiplier(DEFAULT_TARGET, DEFAULT_DELTA, DEFAULT_RATE,
                                       DEFAULT_ROUNDS * DEFAULT_STEPS, accountant)
    return rounds(noise, DEFAULT_RATE)


HISTORIES = {
    "mixed rounds": [PrivacyStep(1, 1.1, 0.05, 12), PrivacyStep(2, 0.9, 0.1, 8), PrivacyStep(3, 1.5, 0.02, 40)],
    "private init + settled short round": [PrivacyStep(0, 1.2, 0.125, 1), *rounds(1.2, 0.125, count=1),
                                           PrivacyStep(2, 1.2, 0.125, 7), *rounds(1.2, 0.125, count=1, first=3)],
    "small rate, many steps": rounds(0.8, 0.01, steps=100, count=2),
    "high noise": [PrivacyStep(1, 3.0, 0.2, 10), PrivacyStep(2, 2.5, 0.25, 10)],
    "full batch": rounds(5.0, 1.0, steps=1),
}


def dp_event(history: list[PrivacyStep]) -> dp_accounting.DpEvent:
    """The history as dp-accounting's event: each round a self-composition of Poisson-sampled Gaussians."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(row.sample_rate, dp_accounting.GaussianDpEvent(row.noise_multiplier)),
            row.steps)
        for row in history
    ])


def reference_epsilon(history: list[PrivacyStep], delta: float, accountant: str) -> float:
    if accountant == "rdp":
        reference = rdp.RdpAccountant()
    else:
        reference = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    reference.compose(dp_event(history))
    return float(reference.get_epsilon(delta))


def tolerance(accountant: str, reference: float) -> float:
    return RDP_RELATIVE_TOLERANCE * reference if accountant == "rdp" else PRV_ABSOLUTE_TOLERANCE


def agrees(ours: float, reference: float, accountant: str) -> bool:
    return abs(ours - reference) <= tolerance(accountant, reference)


CASES = [("fedlora default", "rdp", DEFAULT_DELTA), ("fedlora default", "prv", DEFAULT_DELTA),
         ("fedlora default", "rdp", 1e-3)]
CASES += [(name, accountant, DEFAULT_DELTA) for name in HISTORIES for accountant in ("rdp", "prv")]


@pytest.mark.parametrize("name, accountant, delta", CASES)
def test_epsilon_agrees_with_dp_accounting(name, accountant, delta):
    history = default_history(accountant) if name == "fedlora default" else HISTORIES[name]
    ours = epsilon_of(history, delta, accountant)
    reference = reference_epsilon(history, delta, accountant)
    assert math.isfinite(ours) and ours > 0
    assert agrees(ours, reference, accountant), f"{name}: fedlora {ours:.5f}, dp-accounting {reference:.5f}"


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_bug_in_the_history_would_fail_the_check(accountant):
    """The tolerance is tight enough to catch a real bug: a round lost or doubled, a doubled sample rate."""
    history = default_history(accountant)
    ours = epsilon_of(history, DEFAULT_DELTA, accountant)
    noise = history[0].noise_multiplier
    bugs = {
        "one round too few": rounds(noise, DEFAULT_RATE, count=DEFAULT_ROUNDS - 1),
        "one round too many": rounds(noise, DEFAULT_RATE, count=DEFAULT_ROUNDS + 1),
        "one step too few": [*history[:-1], PrivacyStep(DEFAULT_ROUNDS, noise, DEFAULT_RATE, DEFAULT_STEPS - 1)],
        "sample rate doubled": rounds(noise, 2 * DEFAULT_RATE),
    }
    for bug, wrong in bugs.items():
        assert not agrees(ours, reference_epsilon(wrong, DEFAULT_DELTA, accountant), accountant), bug


CALIBRATIONS = [  # (target epsilon, delta, sample rate, steps)
    (DEFAULT_TARGET, DEFAULT_DELTA, DEFAULT_RATE, DEFAULT_ROUNDS * DEFAULT_STEPS),
    (1.0, 1e-5, 0.05, 300),
    (0.5, 1e-6, 0.01, 1000),
    (3.0, 1e-4, 0.1, 31),
    (20.0, 1e-5, 0.5, 10),
]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target, delta, rate, steps", CALIBRATIONS)
def test_calibrated_noise_is_the_smallest_that_meets_the_target(target, delta, rate, steps, accountant):
    noise = calibrate_noise_multiplier(target, delta, rate, steps, accountant)
    assert epsilon_of([PrivacyStep(1, noise, rate, steps)], delta, accountant) <= target
    assert epsilon_of([PrivacyStep(1, 0.98 * noise, rate, steps)], delta, accountant) > target


def test_calibration_meets_the_target_over_rounds_as_the_ledger_composes_them():
    """The client calibrates for its planned steps at once; its ledger composes them round by round."""
    for accountant in ("rdp", "prv"):
        history = default_history(accountant)
        assert epsilon_of(history, DEFAULT_DELTA, accountant) <= DEFAULT_TARGET
        assert reference_epsilon(history, DEFAULT_DELTA, accountant) <= DEFAULT_TARGET + tolerance(accountant, 8.0)


def test_a_target_no_noise_can_meet_is_refused():
    """RDP's epsilon has a floor over its finite orders (about 0.1 at delta 1e-5): no noise reaches 0.05."""
    with pytest.raises(ValueError, match="needs a noise multiplier above"):
        calibrate_noise_multiplier(0.05, 1e-5, 0.2, 30, "rdp")
