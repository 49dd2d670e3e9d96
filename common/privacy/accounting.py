"""Epsilon from a history of DP-SGD rounds, with Opacus' RDP or PRV accountant.

A history row is (noise multiplier, sample rate, steps) for one round; the accountant composes the rows.
The same function serves the client's budget check, the server's report and anyone re-checking
`privacy.json`, so a reported epsilon is always recomputed from the recorded steps.

Cross-checked (tests/test_accounting_crosscheck.py) against Google's independent `dp-accounting`: RDP
against its RDP accountant, PRV against its PLD accountant, on multi-round histories. Agreement is not
exact, for known reasons: RDP minimises over a finite grid of orders, and dp-accounting drops fractional
orders whose series does not converge (so its epsilon can be a little larger, measured <= 0.5%); Opacus'
PRV returns an upper bound at most `eps_error` = 0.01 above its estimate, and the PLD is discretized (so
PRV sits about 0.01 above the PLD value). Both tolerances are far below what a wrong step count or
sample rate changes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterable


@dataclass(frozen=True)
class PrivacyStep:
    """One round of local DP-SGD: `steps` Poisson-sampled steps at `sample_rate` with this noise."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: object) -> "PrivacyStep":
        """Inverse of `to_dict` for rows read from JSON; ValueError unless every field is a valid number."""
        if not isinstance(row, dict) or set(row) != {"round", "noise_multiplier", "sample_rate", "steps"}:
            raise ValueError(f"a history row needs exactly round, noise_multiplier, sample_rate, steps: {row!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values()):
            raise ValueError(f"history row values must be numbers: {row!r}")
        if not all(math.isfinite(v) for v in row.values()):  # NaN passes the range checks, inf breaks int()
            raise ValueError(f"non-finite value in history row {row!r}")
        if row["noise_multiplier"] < 0 or not 0 < row["sample_rate"] <= 1 or row["steps"] < 0:
            raise ValueError(f"history row out of range: {row!r}")
        return cls(int(row["round"]), float(row["noise_multiplier"]), float(row["sample_rate"]), int(row["steps"]))


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The rate Opacus' DPDataLoader uses for a loader of this batch size: 1 / len(loader)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def epsilon_of(history: Iterable[PrivacyStep], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composition of every row of `history` at `delta` (0 for an empty history)."""
    rows = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history if s.steps > 0]
    if not rows:
        return 0.0
    if any(noise <= 0 for noise, _, _ in rows):
        return math.inf
    return _epsilon_cached(tuple(rows), delta, accountant)


@lru_cache(maxsize=1024)
def _epsilon_cached(rows: tuple, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(rows)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only not the tightest possible.
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(acc.get_epsilon(delta=delta))


def check_history_covers(history: Iterable[PrivacyStep], trained_rounds: Iterable[int], client_id: str) -> None:
    """ValueError naming the rounds a client is known to have trained (e.g. from the server's replies) that
    its history lacks: an epsilon composed without them would under-state what was spent."""
    missing = sorted(set(trained_rounds) - {row.round for row in history})
    if missing:
        raise ValueError(f"client {client_id}: the privacy ledger has no row for trained round(s) "
                         f"{', '.join(map(str, missing))}; its epsilon would leave them out")


def epsilon_curve(history: list[PrivacyStep], delta: float, accountant: str = "rdp") -> list[float]:
    """Cumulative epsilon after each row, for the per-round plot."""
    return [epsilon_of(history[: i + 1], delta, accountant) for i in range(len(history))]


# Calibration brackets the smallest sufficient noise to this relative width: far below the 2% by which a
# smaller noise must already miss the target, and only a handful of epsilon evaluations (measured: 5-8).
NOISE_RELATIVE_TOLERANCE = 1e-3
# No sane run needs noise near this (20x plan.MAX_NOISE_MULTIPLIER); RDP's epsilon even has a floor at any
# noise, set by its largest order, so the search stops here instead of growing forever.
NOISE_SEARCH_LIMIT = 1e3
_NOISE_SEARCH_STEP = 4.0
_NOISE_SEARCH_FLOOR = 1e-3


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to 0.1%) whose `steps` steps at `sample_rate` stay within target epsilon.

    A search on `epsilon_of` itself, so the ledger, the report and the calibration agree on what "within
    target" means. ValueError if even NOISE_SEARCH_LIMIT misses the target.
    """
    def excess(noise: float) -> float:  # log(epsilon / target): > 0 misses the target
        eps = epsilon_of([PrivacyStep(0, noise, sample_rate, steps)], delta, accountant)
        return math.log(eps / target_epsilon) if 0 < eps < math.inf else (math.inf if eps else -math.inf)

    high, f_high = 1.0, excess(1.0)
    while f_high > 0:
        if high >= NOISE_SEARCH_LIMIT:
            raise ValueError(f"target epsilon {target_epsilon} needs a noise multiplier above {NOISE_SEARCH_LIMIT:g} "
                             f"for {steps} steps at sample rate {sample_rate:.4g} (delta {delta:g}, {accountant})")
        high *= _NOISE_SEARCH_STEP
        f_high = excess(high)
    low, f_low = high / _NOISE_SEARCH_STEP, excess(high / _NOISE_SEARCH_STEP)
    while f_low <= 0:
        if low <= _NOISE_SEARCH_FLOOR:
            return low
        high, f_high, low = low, f_low, low / _NOISE_SEARCH_STEP
        f_low = excess(low)
    # The bracket [low, high] holds the answer. log(epsilon) is nearly linear in log(noise), so interpolate
    # and evaluate just above and just below the estimate; bisect whenever that does not halve the bracket.
    straddle = 1 + NOISE_RELATIVE_TOLERANCE / 4
    while high / low > 1 + NOISE_RELATIVE_TOLERANCE:
        before = math.log(high / low)
        guess = _log_interpolated_root(low, f_low, high, f_high)
        for noise in (guess * straddle, guess / straddle):
            if low < noise < high:
                f = excess(noise)
                low, f_low, high, f_high = (low, f_low, noise, f) if f <= 0 else (noise, f, high, f_high)
        if math.log(high / low) > before / 2 and high / low > 1 + NOISE_RELATIVE_TOLERANCE:
            mid = math.sqrt(low * high)
            f = excess(mid)
            low, f_low, high, f_high = (low, f_low, mid, f) if f <= 0 else (mid, f, high, f_high)
    return high


def noise_or_inf(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """`calibrate_noise_multiplier`, or inf where even NOISE_SEARCH_LIMIT misses the target (plan checks)."""
    try:
        return calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    except ValueError:
        return math.inf


def describe_needed_noise(noise: float) -> str:
    """How a refusal names the noise a plan needs: the value, or "more than" the search limit."""
    return f"more than {NOISE_SEARCH_LIMIT:g}" if math.isinf(noise) else f"{noise:.3g}"


def _log_interpolated_root(low: float, f_low: float, high: float, f_high: float) -> float:
    """Where the line through (log low, f_low) and (log high, f_high) crosses 0 (geometric mean if undefined)."""
    if not (math.isfinite(f_low) and math.isfinite(f_high)) or f_low == f_high:
        return math.sqrt(low * high)
    t = f_low / (f_low - f_high)
    return math.exp(math.log(low) + t * math.log(high / low))
