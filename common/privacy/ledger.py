"""A client's privacy ledger: every round it trained, on disk, surviving rounds and restarts.

Opacus' accountant lives inside a PrivacyEngine, and a new engine per round would forget what was
spent. The ledger is the source of truth instead. A training round is counted step by step: `open_round`
checks that all its planned steps fit the budget, then `count_step` adds one step to the round's row,
durably, *before* each DP step runs. So a crash can never hide a step, and a client killed after j of S
steps has exactly j in its ledger (a step that began counts, even if the crash came before its noise:
its batch was drawn and its gradients computed). Writes are atomic (temp file, fsync, rename, fsync of
the directory) so a killed process leaves the old or the new ledger, never half of one.

A round number can appear twice: a client that crashed (or whose server crashed and resumed from an
earlier checkpoint) and is sent the same round again trains it as a new execution with a row of its own.
The steps of the first execution ran and consumed privacy even though nothing was released, so its row
stays; the new row starts at 0 steps, so no step is counted twice. An execution that crashed before its
first step leaves no row (nothing ran).

The file carries a SHA-256 checksum of its content, checked on every load: a truncated, corrupted or
hand-edited ledger raises LedgerError instead of being read as less spending than happened. A ledger
from before checksums is refused too (it cannot be told from one whose checksum was cut off);

    python -m common.privacy.ledger seal PATH     # after checking PATH by eye: add its checksum
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

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
        self._open: PrivacyStep | None = None  # the round being counted step by step (open_round)
        self._open_row: int | None = None  # its row in history, once its first step is counted
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

    def open_round(self, step: PrivacyStep) -> None:
        """Start counting a round step by step; refuse (ValueError) unless all `step.steps` fit the budget.

        Nothing is written yet: the round's row appears with its first `count_step`, as its own row even if
        an earlier execution of the same round number left one (see the module docstring)."""
        if not self.allows(step):
            raise ValueError(
                f"client {self.client_id}: round {step.round} would reach epsilon "
                f"{self.epsilon_if(step):.3f} > target {self.target_epsilon}"
            )
        self._open, self._open_row = step, None

    def count_step(self) -> None:
        """One more DP step of the open round, on disk before the step runs (call it first thing in a step)."""
        if self._open is None:
            raise ValueError(f"client {self.client_id}: count_step without open_round")
        if self._open_row is None:
            self.history.append(PrivacyStep(self._open.round, self._open.noise_multiplier, self._open.sample_rate, 0))
            self._open_row = len(self.history) - 1
        row = self.history[self._open_row]
        if row.steps >= self._open.steps:
            raise ValueError(f"client {self.client_id}: round {row.round} would take more than the "
                             f"{self._open.steps} steps its budget check allowed")
        self.history[self._open_row] = PrivacyStep(row.round, row.noise_multiplier, row.sample_rate, row.steps + 1)
        self._save()

    def close_round(self, steps_taken: int) -> None:
        """End the open round; `steps_taken` (the training loop's count) must not exceed the counted steps."""
        counted = 0 if self._open_row is None else self.history[self._open_row].steps
        if steps_taken > counted:
            raise ValueError(f"client {self.client_id}: the round took {steps_taken} steps but the ledger "
                             f"counted {counted}: a step ran uncounted")
        self._open, self._open_row = None, None

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
    return sha256_of(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())


def sha256_of(blob: bytes) -> str:
    """`sha256:<hex>` of raw bytes: the form every checksum of ledgers and checkpoints takes."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def write_ledger(path: Path, content: dict) -> None:
    """Atomically write `content` and its checksum: a killed process leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump({**content, CHECKSUM_KEY: checksum_of(content)}, handle, indent=1, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (the new name survives a power loss, not only a killed process)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# Where `noise_within_budget` searches: below 0.3 a few rows already spend any sane budget, above 200 the
# rows add next to nothing (the same bracket for every extra step a client takes after the run).
EXTRA_NOISE_SEARCH = (0.3, 200.0)


def noise_within_budget(ledger: PrivacyLedger, extra_rows: Callable[[float], list[PrivacyStep]]) -> float | None:
    """The smallest noise multiplier (to 1%) at which the ledger's history plus `extra_rows(sigma)` stays
    within its target, or None if even the largest in EXTRA_NOISE_SEARCH does not fit (LoKU, personalization)."""
    def fits(sigma: float) -> bool:
        rows = [*ledger.history, *extra_rows(sigma)]
        return epsilon_of(rows, ledger.delta, ledger.accountant) <= ledger.target_epsilon + BUDGET_SLACK

    low, high = EXTRA_NOISE_SEARCH
    if not fits(high):
        return None
    if fits(low):
        return low
    while high / low > 1.01:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high
