"""Epsilon from a history of DP-SGD rounds, with Opacus' RDP or PRV accountant.

A history row is (noise multiplier, sample rate, steps) for one round; the accountant composes the rows.
The same function serves the client's budget check, the server's report and anyone re-checking
`privacy.json`, so a reported epsilon is always recomputed from the recorded steps.
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


def epsilon_curve(history: list[PrivacyStep], delta: float, accountant: str = "rdp") -> list[float]:
    """Cumulative epsilon after each row, for the per-round plot."""
    return [epsilon_of(history[: i + 1], delta, accountant) for i in range(len(history))]


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier whose `steps` steps at `sample_rate` stay within target epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order")  # see _epsilon_cached
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                accountant=accountant, epsilon_tolerance=0.01,
            )
        )
