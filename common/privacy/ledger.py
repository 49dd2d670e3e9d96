"""A client's privacy ledger: every round it trained, on disk, surviving rounds and restarts.

Opacus' accountant lives inside a PrivacyEngine, and a new engine per round would forget what was
spent. The ledger is the source of truth instead: a round is charged *before* it trains (so a crash
mid-round cannot hide steps), then settled with the steps actually taken. Writes are atomic
(temp file, fsync, rename) so a killed process leaves the old or the new ledger, never half of one.

The file carries a SHA-256 checksum of its content, checked on every load: a truncated, corrupted or
hand-edited ledger raises LedgerError instead of being read as less spending than happened. A ledger
from before checksums is refused too (it cannot be told from one whose checksum was cut off);

    python -m common.privacy.ledger seal PATH     # after checking PATH by eye: add its checksum
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

from common.errors import LedgerError, exit_on_user_error
from common.privacy.accounting import PrivacyStep, epsilon_of

CHECKSUM_KEY = "checksum"
FIELDS = ("client_id", "target_epsilon", "delta", "accountant", "history")
RESTORE_HINT = ("restore it from a backup; do not delete it, which would forget the privacy budget this client "
                "has already spent")

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
        data = read_ledger(self.path)
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
        write_ledger(self.path, self.to_dict())


def checksum_of(content: dict) -> str:
    """`sha256:<hex>` of the canonical JSON of `content` (sorted keys, no spaces), the checksum key excluded."""
    body = {k: v for k, v in content.items() if k != CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def write_ledger(path: Path, content: dict) -> None:
    """Atomically write `content` and its checksum: a killed process leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump({**content, CHECKSUM_KEY: checksum_of(content)}, handle, indent=1, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_ledger(path: Path) -> dict:
    """The content of a ledger file whose checksum matches; LedgerError (naming the path) otherwise."""
    data = _parse(path)
    if CHECKSUM_KEY not in data:
        raise LedgerError(
            f"privacy ledger {path} has no checksum: it was cut short, edited, or written by a fedlora before "
            f"checksums. If its history is right, seal it with `python -m common.privacy.ledger seal {path}`; "
            f"otherwise {RESTORE_HINT}")
    if data[CHECKSUM_KEY] != checksum_of(data):
        raise LedgerError(f"privacy ledger {path} does not match its checksum (corrupted or edited): {RESTORE_HINT}")
    return data


def _parse(path: Path) -> dict:
    """The ledger's JSON object with every field, else LedgerError (never an empty ledger)."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as err:
        raise LedgerError(f"privacy ledger {path} cannot be read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LedgerError(f"privacy ledger {path} is not valid JSON (truncated or corrupted: {err}): "
                          f"{RESTORE_HINT}") from None
    missing = [k for k in FIELDS if k not in data] if isinstance(data, dict) else list(FIELDS)
    if missing:
        raise LedgerError(f"privacy ledger {path} lacks {', '.join(missing)} (truncated or corrupted): {RESTORE_HINT}")
    return data


def seal(path: Path) -> dict:
    """Add the checksum to a ledger written before checksums, after checking that its history parses."""
    data = _parse(path)
    try:
        for row in data["history"]:
            PrivacyStep.from_dict(row)
    except (TypeError, ValueError) as err:
        raise LedgerError(f"privacy ledger {path} has an invalid history ({err}): not sealed") from None
    write_ledger(path, {k: v for k, v in data.items() if k != CHECKSUM_KEY})
    return data


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Add a checksum to privacy ledgers written before checksums.")
    parser.add_argument("command", choices=["seal"])
    parser.add_argument("paths", type=Path, nargs="+", help="ledger files (client-<id>.json)")
    args = parser.parse_args(argv)
    for path in args.paths:
        data = seal(path)
        print(f"sealed {path}: client {data['client_id']}, {len(data['history'])} rounds")


if __name__ == "__main__":
    main()
