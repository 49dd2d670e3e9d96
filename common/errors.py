"""User-facing errors: printed as one line, never as a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class FedloraError(Exception):
    """A mistake in the user's input (config, data file, command line).

    The message must say what is wrong and how to fix it, in one line.
    """


class ConfigError(FedloraError):
    """A run-config value is missing, of the wrong type or out of range."""


class DataError(FedloraError):
    """A data file is missing or malformed; the message names the file and line."""


class LedgerError(FedloraError):
    """A privacy ledger file is truncated, corrupted or was edited: never read as an empty ledger."""


class CheckpointError(FedloraError):
    """A server checkpoint is truncated, corrupted, or of another run config: never a silent restart."""


def exit_on_user_error(main: F) -> F:
    """Wrap a command-line entry point: a FedloraError becomes `error: ...` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FedloraError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
