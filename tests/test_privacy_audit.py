"""The one-run audit's math (common/privacy/audit.py) against brute force, closed forms and simulations."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from common.privacy.audit import (
    audit,
    canary_scores,
    count_correct,
    epsilon_lower_bound,
    guess_membership,
    include_canaries,
    one_run_p_value,
)


@functools.lru_cache
def patterns_with_right(guesses: int) -> tuple[int, ...]:
    """How many of the 2^guesses right/wrong patterns have 0, 1, ... right guesses, by enumeration."""
    counts = [0] * (guesses + 1)
    for pattern in itertools.product((0, 1), repeat=guesses):
        counts[sum(pattern)] += 1
    return tuple(counts)


def brute_force_p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """Theorem 3's p-value with each tail summed over all right/wrong patterns (no scipy)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [n * q ** right * (1 - q) ** (guesses - right) for right, n in enumerate(patterns_with_right(guesses))]
    beta = sum(pmf[correct:])
    alpha = max((sum(pmf[correct - i:correct]) / i for i in range(1, correct + 1)), default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


def brute_force_bound(m: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """Largest epsilon on a fine grid whose brute-force p-value is <= 1 - confidence."""
    grid = np.arange(0.0, 8.0, 1e-3)
    refuted = [eps for eps in grid if brute_force_p_value(m, guesses, correct, eps, delta) <= 1 - confidence]
    return max(refuted, default=0.0)


def pure_dp_all_correct_bound(guesses: int, confidence: float = 0.95) -> float:
    """Closed form for k = g, delta = 0: q^g <= 1 - confidence, so q = (1 - c)^(1/g), eps = logit(q)."""
    q = (1 - confidence) ** (1 / guesses)
    return max(0.0, math.log(q / (1 - q)))


@pytest.mark.parametrize("m, guesses, correct, eps, delta", [
    (10, 6, 6, 1.0, 0.0), (10, 6, 5, 0.3, 1e-3), (20, 10, 9, 2.0, 1e-2), (12, 12, 8, 0.5, 0.0),
    (50, 8, 4, 1.5, 1e-3), (16, 11, 11, 3.0, 1e-4),
])
def test_p_value_matches_brute_force(m, guesses, correct, eps, delta):
    assert one_run_p_value(m, guesses, correct, eps, delta) == pytest.approx(
        brute_force_p_value(m, guesses, correct, eps, delta), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("m, guesses, correct, delta", [(10, 10, 10, 0.0), (12, 10, 9, 0.0), (40, 12, 12, 1e-3),
                                                        (40, 12, 11, 1e-4)])
def test_bound_matches_brute_force_search(m, guesses, correct, delta):
    ours = epsilon_lower_bound(m, guesses, correct, delta)
    assert ours > 0
    assert ours == pytest.approx(brute_force_bound(m, guesses, correct, delta, 0.95), abs=2e-3)


@pytest.mark.parametrize("guesses", [5, 10, 20, 50, 100, 1000])
def test_all_correct_matches_the_closed_form_and_grows_with_guesses(guesses):
    assert epsilon_lower_bound(guesses, guesses, guesses, 0.0) == pytest.approx(
        pure_dp_all_correct_bound(guesses), abs=1e-5)
    assert epsilon_lower_bound(guesses, guesses, guesses, 0.0) > epsilon_lower_bound(
        guesses - 1, guesses - 1, guesses - 1, 0.0)


def test_too_few_guesses_refute_nothing():
    # 4 of 4 right happens with probability 1/16 > 0.05 even without any leakage
    assert epsilon_lower_bound(4, 4, 4, 0.0) == 0.0
    assert epsilon_lower_bound(100, 0, 0, 0.0) == 0.0


@pytest.mark.parametrize("guesses", [2, 10, 100, 1000])
def test_half_right_is_chance_and_refutes_nothing(guesses):
    for correct in range(guesses // 2 + 1):
        assert epsilon_lower_bound(guesses, guesses, correct, 1e-5) == 0.0


def test_bound_is_monotone_and_never_above_all_correct():
    m, guesses, delta = 1000, 200, 1e-5
    bounds = [epsilon_lower_bound(m, guesses, k, delta) for k in range(guesses // 2, guesses + 1, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[0] == 0.0
    assert max(bounds) <= pure_dp_all_correct_bound(guesses)  # delta > 0 only weakens what can be refuted
    # more confidence, a larger delta or more canaries (each a chance to fail) refute less
    assert epsilon_lower_bound(m, guesses, 180, delta, 0.99) < epsilon_lower_bound(m, guesses, 180, delta, 0.95)
    assert epsilon_lower_bound(m, guesses, 180, 1e-3) < epsilon_lower_bound(m, guesses, 180, 1e-5)
    assert epsilon_lower_bound(10 * m, guesses, 180, 1e-3) < epsilon_lower_bound(m, guesses, 180, 1e-3)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """Exact (eps, delta) of one Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018)."""
    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(excess, 0.0, 100.0)


def simulated_audit(mu: float, m: int, guesses: int, delta: float, rng: np.random.Generator):
    """Canaries whose score is N(mu, 1) if included, N(0, 1) if not: each canary's bit leaks mu-GDP."""
    included = include_canaries(m, rng)
    scores = rng.normal(size=m) + mu * included
    return audit(scores, included, guesses // 2, guesses // 2, delta)


def test_a_private_mechanism_is_almost_never_refuted():
    """With probability >= 95% the bound stays below the true epsilon; a bound above it would be a bug."""
    rng = np.random.default_rng(0)
    mu, delta = 1.0, 1e-5
    true_eps = gaussian_dp_epsilon(mu, delta)  # about 4.4 for mu = 1
    results = [simulated_audit(mu, 1000, 200, delta, rng) for _ in range(40)]
    above = sum(r.epsilon_lower_bound > true_eps for r in results)
    assert above <= 2  # 5% of 40
    assert max(r.epsilon_lower_bound for r in results) > 0  # the audit does see the leakage


def test_randomized_response_bounds_cover_the_truth_at_the_stated_confidence():
    """Pure eps-DP randomized response: each guess right with probability e^eps / (1 + e^eps)."""
    rng = np.random.default_rng(1)
    eps, guesses = 1.0, 500
    correct = rng.binomial(guesses, math.exp(eps) / (1 + math.exp(eps)), size=400)
    bounds = np.array([epsilon_lower_bound(guesses, guesses, int(k), 0.0) for k in correct])
    assert np.mean(bounds > eps) <= 0.05 + 0.02  # the stated 5%, plus sampling slack for 400 trials
    assert np.median(bounds) > 0.5 * eps  # and is not trivially 0


def test_without_dp_the_bound_is_large():
    """No noise: every canary is separated, and the bound is near the most 200 guesses can show."""
    rng = np.random.default_rng(2)
    result = simulated_audit(mu=50.0, m=1000, guesses=200, delta=1e-5, rng=rng)
    assert result.correct == result.guesses == 200
    assert result.epsilon_lower_bound > 0.95 * pure_dp_all_correct_bound(200) > 3.9
    assert result.epsilon_lower_bound > 10 * simulated_audit(0.05, 1000, 200, 1e-5, rng).epsilon_lower_bound + 1


def test_guesses_take_the_top_as_in_and_the_bottom_as_out():
    scores = [0.1, 0.9, -0.5, 0.3, 0.7, -0.2]
    assert guess_membership(scores, 2, 1).tolist() == [0, 1, -1, 0, 1, 0]
    assert guess_membership(scores, 0, 0).tolist() == [0] * 6
    made, right = count_correct(np.array([1, 1, -1, 0, -1]), np.array([True, False, False, True, True]))
    assert (made, right) == (4, 2)
    with pytest.raises(ValueError):
        guess_membership(scores, 4, 3)


def test_scores_rank_the_most_reduced_loss_first():
    assert canary_scores([0.5, 2.0, 1.0]).tolist() == [-0.5, -2.0, -1.0]
    # a hard canary whose loss fell a lot outranks an easy one that was always low
    scores = canary_scores(final_losses=[0.4, 1.0], initial_losses=[0.5, 3.0])
    assert guess_membership(scores, 1, 1).tolist() == [-1, 1]


def test_canaries_are_included_with_probability_one_half_and_seeded():
    included = include_canaries(10_000, np.random.default_rng(3))
    assert abs(included.mean() - 0.5) < 0.02
    assert (include_canaries(50, np.random.default_rng(4)) == include_canaries(50, np.random.default_rng(4))).all()


def test_audit_record_has_the_privacy_json_fields():
    rng = np.random.default_rng(5)
    record = simulated_audit(mu=3.0, m=100, guesses=40, delta=1e-5, rng=rng).to_dict()
    assert set(record) == {"canaries", "guesses", "correct", "epsilon_lower_bound", "confidence"}
    assert record["canaries"] == 100 and record["guesses"] == 40 and record["confidence"] == 0.95
    assert 0 <= record["correct"] <= 40


def test_invalid_counts_are_rejected():
    with pytest.raises(ValueError):
        one_run_p_value(10, 11, 5, 1.0, 0.0)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 6, 0.0)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 5, 0.0, confidence=1.0)
