"""A client's privacy ledger: every round it trained, on disk, surviving rounds and restarts.

Opacus' accountant lives inside a PrivacyEngine, and a new engine per round would forget what was
spent. The ledger is the source of truth instead: a round is charged *before* it trains (so a crash
mid-round cannot hide steps), then settled with the steps actually taken. Writes are atomic
(temp file, fsync, rename) so a killed process leaves the old or the new ledger, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common.privacy.accounting import PrivacyStep, epsilon_of

# Epsilon values are computed by a numerical search; allow rounding noise at the budget boundary.
BUDGET_SLACK = 1e-6


class PrivacyLedger:
    def __init__(self, path: Path | str, client_id: str, target_epsilon: float, delta: float,
                 accountant: str = "rdp"):
        self.path = Path(path)
        self.client_id = client_id
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant = accountant
        self.history: list[PrivacyStep] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = json.loads(self.path.read_text())
        if data["client_id"] != self.client_id:
            raise ValueError(f"{self.path} belongs to client {data['client_id']}, not {self.client_id}")
        if data["delta"] != self.delta or data["accountant"] != self.accountant:
            raise ValueError(
                f"{self.path} was kept at delta={data['delta']} with {data['accountant']}; "
                f"this run asks delta={self.delta} with {self.accountant}: use a new run-dir"
            )
        self.history = [PrivacyStep.from_dict(row) for row in data["history"]]

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_if(self, step: PrivacyStep) -> float:
        """Epsilon after also spending `step`."""
        return epsilon_of([*self.history, step], self.delta, self.accountant)

    def allows(self, step: PrivacyStep) -> bool:
        return self.epsilon_if(step) <= self.target_epsilon + BUDGET_SLACK

    def charge(self, step: PrivacyStep) -> None:
        """Record a round before it runs; refuse (ValueError) if it would exceed the budget."""
        if not self.allows(step):
            raise ValueError(
                f"client {self.client_id}: round {step.round} would reach epsilon "
                f"{self.epsilon_if(step):.3f} > target {self.target_epsilon}"
            )
        self.history.append(step)
        self._save()

    def settle(self, round_number: int, steps_taken: int) -> None:
        """Replace the charged step count of `round_number` with the steps actually taken (never more)."""
        for i in range(len(self.history) - 1, -1, -1):
            row = self.history[i]
            if row.round == round_number:
                if steps_taken > row.steps:
                    raise ValueError(f"round {round_number} took {steps_taken} steps, more than charged")
                self.history[i] = PrivacyStep(row.round, row.noise_multiplier, row.sample_rate, steps_taken)
                self._save()
                return
        raise KeyError(f"round {round_number} was never charged")

    def to_dict(self) -> dict:
        return {
            "client_id": self.client_id,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [row.to_dict() for row in self.history],
        }

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_dict(), handle, indent=1, allow_nan=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
