"""Server checkpoints: after every completed round, RUN_DIR/checkpoint/ holds what a restarted ServerApp
needs to continue the run where it stopped (server/server_app.py resumes automatically).

- `global.safetensors`: the global arrays after round k (adapter factors, head, broadcast frozen bases;
  FLoRA's stack is these arrays);
- `clients.safetensors`: each client's last accepted adapter (`LoRAStrategy.client_adapters`);
- `state.json`: round k, the run config, the strategy's `state_dict()` (the clients' ledgers and every
  fault seen so far, refusals, per-node ranks), Flower's per-round metrics so far, the SHA-256 of both
  tensor files, and a checksum of itself.

Writes are atomic: the files are written and fsynced in `checkpoint.new/`, which replaces `checkpoint/`
by two renames (`checkpoint` -> `checkpoint.old`, `checkpoint.new` -> `checkpoint`) and an fsync of the
run directory. A crash between the two renames leaves `checkpoint.old/`, which is then read (the run
repeats one round; the clients' ledgers count both executions of it). A checkpoint whose files are
missing, truncated or do not match their checksums is refused with a CheckpointError: a run never starts
again from round 0 by accident, which would train rounds 1..k a second time.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result
from safetensors.numpy import load, save

from common.config import RunConfig
from common.errors import CheckpointError
from common.payload import from_record, to_record
from common.privacy.ledger import CHECKSUM_KEY, checksum_of, fsync_directory, sha256_of

CHECKPOINT = "checkpoint"
STATE, GLOBAL, CLIENTS = "state.json", "global.safetensors", "clients.safetensors"
FORMAT = 1
# Where a run's settings may differ on resume: the run dir is where the checkpoint is found.
IGNORED_SETTINGS = ("run-dir",)
METRICS = {"train": "train_metrics_clientapp", "client-eval": "evaluate_metrics_clientapp",
           "server-eval": "evaluate_metrics_serverapp"}


@dataclass
class Checkpoint:
    """A completed round as saved: enough to continue at round `round + 1`."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict
    strategy_arrays: dict[str, np.ndarray]
    result: Result
    path: Path


def settings_of(run_config: dict) -> dict:
    """The run config as JSON values, without the keys that may differ on resume."""
    plain = json.loads(json.dumps(run_config, default=str))
    return {k: v for k, v in plain.items() if k not in IGNORED_SETTINGS}


def save_checkpoint(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], strategy, result: Result,
                    run_config: dict) -> Path:
    """Atomically replace RUN_DIR/checkpoint with the state after `server_round` (`strategy`: a LoRAStrategy)."""
    current, new, old = (run_dir / f"{CHECKPOINT}{suffix}" for suffix in ("", ".new", ".old"))
    strategy_state, strategy_arrays = strategy.state_dict()
    blobs = {GLOBAL: _tensor_bytes(arrays), CLIENTS: _tensor_bytes(strategy_arrays)}
    state = {"format": FORMAT, "round": server_round, "run_config": settings_of(run_config),
             "files": {name: sha256_of(blob) for name, blob in blobs.items()},
             # safetensors stores tensors in its own order; dict order reaches the clients and the merges
             "order": {GLOBAL: list(arrays), CLIENTS: list(strategy_arrays)},
             "strategy": strategy_state,
             "metrics": {key: {str(rnd): dict(record) for rnd, record in getattr(result, attr).items()}
                         for key, attr in METRICS.items()}}
    state[CHECKSUM_KEY] = checksum_of(state)
    shutil.rmtree(new, ignore_errors=True)  # what a crash in the middle of a save left behind
    new.mkdir()
    for name, blob in blobs.items():
        _write_durably(new / name, blob)
    _write_durably(new / STATE, json.dumps(state, indent=1, allow_nan=True).encode())
    fsync_directory(new)
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(current, old)
    os.replace(new, current)
    fsync_directory(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return current


def load_checkpoint(run_dir: Path, run_config: dict) -> Checkpoint | None:
    """The run's last checkpoint, None if it has none; CheckpointError if it is damaged or of other settings."""
    path = next((p for p in (run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old") if p.is_dir()), None)
    if path is None:
        return None
    state = _read_state(path)
    _check_settings(path, state["run_config"], settings_of(run_config))
    arrays, strategy_arrays = (_read_tensors(path, name, state["files"][name], state["order"][name])
                               for name in (GLOBAL, CLIENTS))
    result = Result(arrays=to_record(arrays))
    for key, attr in METRICS.items():
        setattr(result, attr, {int(rnd): MetricRecord(values) for rnd, values in state["metrics"][key].items()})
    return Checkpoint(round=int(state["round"]), arrays=from_record(result.arrays), strategy_state=state["strategy"],
                      strategy_arrays=strategy_arrays, result=result, path=path)


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"server checkpoint {path} {what}: it cannot be resumed. Restore it from a backup, or delete {path} to "
        f"start this run again from round 0 (the clients' ledgers keep the budget already spent)")


def _read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE).read_bytes())
    except FileNotFoundError:
        raise _damaged(path, f"has no {STATE} (incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, f"has a {STATE} that is not valid JSON (truncated or corrupted: {err})") from None
    if not isinstance(state, dict) or CHECKSUM_KEY not in state:
        raise _damaged(path, f"has a {STATE} without a checksum (truncated or edited)")
    if state[CHECKSUM_KEY] != checksum_of(state):
        raise _damaged(path, f"has a {STATE} that does not match its checksum (corrupted or edited)")
    if state.get("format") != FORMAT:
        raise _damaged(path, f"is of format {state.get('format')!r}; this fedlora reads format {FORMAT}")
    return state


def _check_settings(path: Path, saved: dict, now: dict) -> None:
    """A key the saved settings lack was added to fedlora after that run: it matches when now at its default
    (the behaviour the run had), so upgrading fedlora does not orphan a run directory."""
    defaults = settings_of(RunConfig().to_flower())
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))
    if differ:
        changes = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise CheckpointError(
            f"server checkpoint {path} was written by a run with other settings ({changes}): resume with the "
            f"settings in its state.json, or use a new run-dir; to start a new run in this directory (its "
            f"ledgers, and the budget they spent, are kept) delete {path}")


def _read_tensors(path: Path, name: str, expected: str, order: list[str]) -> dict[str, np.ndarray]:
    try:
        blob = (path / name).read_bytes()
    except FileNotFoundError:
        raise _damaged(path, f"has no {name}") from None
    if sha256_of(blob) != expected:
        raise _damaged(path, f"has a {name} that does not match the checksum in {STATE} (truncated or corrupted)")
    tensors = load(blob)
    return {key: tensors[key] for key in order}


def _tensor_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    return save({key: np.ascontiguousarray(value) for key, value in arrays.items()})


def _write_durably(path: Path, blob: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())
