"""A client's personal adapter factors (FedSA-LoRA's B): trained every round, kept on its own disk, never sent.

The file sits beside the client's ledger, `LEDGER_DIR/personal/client-<id>.safetensors`, and is rewritten
(atomically) after every round the client trains. Its metadata names the run directory: a ledger dir that a
new run reuses (it keeps the ledgers on purpose) does not hand that run another run's B, which would not
fit the new shared A; the new run starts from the adapter's init instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import nn

from common.logs import get_logger
from common.payload import load_state, trainable_state

log = get_logger("client")


def personal_path(ledger_dir: Path, client_id: str) -> Path:
    return Path(ledger_dir) / "personal" / f"client-{client_id}.safetensors"


def personal_keys(model: nn.Module, factors: tuple[str, ...]) -> list[str]:
    """The model's trainable parameters that belong to one of `factors` (e.g. every `...lora_B.weight`)."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and any(part in factors for part in name.split("."))]


def read_personal(path: Path, run: str) -> dict[str, np.ndarray] | None:
    """This client's personal factors of run `run`, or None if it has none (yet) for that run."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as handle:
        saved_run = (handle.metadata() or {}).get("run-dir", "")
    if saved_run != run:
        log.info("%s holds personal factors of another run (%s): starting them from the adapter's init",
                 path, saved_run)
        return None
    return load_file(str(path))


def load_personal(model: nn.Module, path: Path, run: str, factors: tuple[str, ...]) -> bool:
    """Load this client's personal factors of run `run` into `model`; False (model unchanged) if it has none yet."""
    arrays = read_personal(path, run) if factors else None
    if arrays is None:
        return False
    load_state(model, arrays)  # a PayloadError (user-facing) if they do not fit this model
    return True


def save_personal(model: nn.Module, path: Path, run: str, factors: tuple[str, ...]) -> list[str]:
    """Write the model's personal factors to `path` (temp file + rename); the keys written."""
    keys = personal_keys(model, factors)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(trainable_state(model, keys), str(temporary), metadata={"run-dir": run})
    os.replace(temporary, path)
    return keys
