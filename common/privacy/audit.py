"""The math of a one-run privacy audit (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1)
training run", arXiv:2305.08846): canaries in, membership guesses out, an empirical lower bound on epsilon.

Each of m canaries is included in the training data independently with probability 1/2. After training
the auditor scores every canary, guesses "in" for the g_in highest scores and "out" for the g_out lowest
(abstaining on the rest), and counts the correct guesses k among the g = g_in + g_out. If training is
(epsilon, delta)-DP, k cannot be much larger than a Binomial(g, e^eps / (1 + e^eps)) variable (Theorem 3
below); an epsilon under which the observed k is too unlikely is refuted, and the largest refuted epsilon
is the audit's lower bound. Everything here is a pure function so that tests can check it by brute force.

What is implemented, exactly: the p-value of their Theorem 3 (main result for (eps, delta)-DP),

    P[W >= v] <= beta + 2 m delta * alpha,   beta  = P[Binomial(r, q) >= v],
                                              alpha = max_{i = 1..v} P[v > Binomial(r, q) >= v - i] / i,

with q = e^eps / (1 + e^eps), r guesses, v correct and m canaries (delta = 0 gives their Theorem 1: W is
stochastically dominated by Binomial(r, q)). Simplification: their Algorithm 2 bounds the same tail
numerically and can be tighter when delta > 0; the closed form's p-value is never smaller, so the bound
here can only under-state the leakage (conservative), never overstate it. Independent implementations
(e.g. jax_privacy's auditing module) evaluate the same closed form.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binom

# An audit can refute no epsilon above about log(g) anyway (k = g of g is the most it can see); the search
# stops far above that.
EPSILON_SEARCH_MAX = 100.0


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Upper bound (Theorem 3) on P[at least `correct` of `guesses` are right] under (epsilon, delta)-DP."""
    _check_counts(m, guesses, correct)
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return beta
    i = np.arange(1, correct + 1)
    below = binom.cdf(correct - 1, guesses, q) - binom.cdf(correct - i - 1, guesses, q)  # P[v > W >= v - i]
    alpha = float(np.max(below / i))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that `correct` of `guesses` refutes at `confidence` (0 if it refutes none).

    With probability >= `confidence` over the canaries' coin flips, a run that is (eps, delta)-DP
    yields a bound <= eps: a bound above the accountant's epsilon means the accounting or the DP-SGD
    implementation is wrong.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    significance = 1.0 - confidence

    def refuted(eps: float) -> bool:
        return one_run_p_value(m, guesses, correct, eps, delta) <= significance

    if guesses == 0 or not refuted(0.0):
        return 0.0
    if refuted(EPSILON_SEARCH_MAX):
        return EPSILON_SEARCH_MAX
    low, high = 0.0, EPSILON_SEARCH_MAX  # refuted(low), not refuted(high); the p-value grows with eps
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if refuted(mid) else (low, mid)
    return low


def canary_scores(final_losses: Sequence[float], initial_losses: Sequence[float] | None = None) -> np.ndarray:
    """Membership scores, higher = more likely trained on: the canary's loss drop during training, or
    minus its final loss when the initial losses are unknown (the drop removes per-canary difficulty)."""
    final = np.asarray(final_losses, dtype=float)
    return -final if initial_losses is None else np.asarray(initial_losses, dtype=float) - final


def include_canaries(m: int, rng: np.random.Generator) -> np.ndarray:
    """Which of m canaries go into the training data: each independently with probability 1/2."""
    return rng.random(m) < 0.5


def guess_membership(scores: Sequence[float], guesses_in: int, guesses_out: int) -> np.ndarray:
    """+1 (in) for the `guesses_in` highest scores, -1 (out) for the `guesses_out` lowest, 0 abstains.

    A higher score must mean "more likely trained on", e.g. minus the canary's loss after training.
    """
    scores = np.asarray(scores, dtype=float)
    if guesses_in < 0 or guesses_out < 0 or guesses_in + guesses_out > len(scores):
        raise ValueError(f"{guesses_in} + {guesses_out} guesses for {len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")
    guess = np.zeros(len(scores), dtype=int)
    guess[order[:guesses_in]] = 1
    guess[order[len(scores) - guesses_out:]] = -1
    return guess


def count_correct(guess: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(guesses made, correct guesses) for a +1/0/-1 guess vector against the true inclusion."""
    guess, included = np.asarray(guess), np.asarray(included, dtype=bool)
    made = guess != 0
    right = (guess == 1) & included | (guess == -1) & ~included
    return int(made.sum()), int(right.sum())


@dataclass(frozen=True)
class AuditResult:
    """What `privacy.json` records for the audited client."""

    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def audit(scores: Sequence[float], included: np.ndarray, guesses_in: int, guesses_out: int, delta: float,
          confidence: float = 0.95) -> AuditResult:
    """Guess, count and bound in one go, for scored canaries whose true inclusion is known."""
    guess = guess_membership(scores, guesses_in, guesses_out)
    made, right = count_correct(guess, included)
    bound = epsilon_lower_bound(len(guess), made, right, delta, confidence)
    return AuditResult(len(guess), made, right, bound, confidence)


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({m})")
