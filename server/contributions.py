"""Stored per-round client contributions (run config `store-contributions = true`), for exact unlearning.

For every round the server writes RUN_DIR/contributions/:
- `round-<k>.safetensors`: the global arrays the round started from (`global/<key>`) and every accepted
  payload as it was aggregated, after any `max-update-norm` clipping (`<i>/<key>` for the i-th client);
- `round-<k>.json`: the round, the client ids and example weights in payload order, the strategy, the bytes.

A round that aggregated nothing (too few valid replies) gets a manifest with no clients, so a history is
complete exactly when rounds 1..R all have a manifest. The cost is the global adapter plus every accepted
reply, each round: about (clients per round + 1) x the adapter's size per round (logged every round and
summed in metrics.json as `contributions`). These are DP outputs the server received anyway; storing them
costs no privacy, but they are what a deletion request would have to remove, so they are opt-in.

Only linear strategies (a weighted mean of same-shaped payloads, then a deterministic post-processing) can
store them: re-aggregating a round without one client is then exactly that round without it
(`server/unlearn.py`). Server-side noise (user-level DP) is refused too: its noise draw is not stored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from common.errors import ConfigError
from common.logs import get_logger
from server.strategies.base import LoRAStrategy

log = get_logger("server")

CONTRIBUTIONS = "contributions"
GLOBAL_PREFIX = "global/"


@dataclass
class RoundContribution:
    """One stored round: where it started and what each accepted client sent."""

    round: int
    global_before: dict[str, np.ndarray]
    clients: list[str]
    payloads: list[dict[str, np.ndarray]]
    weights: list[float]

    def without(self, client: str) -> "RoundContribution":
        keep = [i for i, c in enumerate(self.clients) if c != client]
        return RoundContribution(self.round, self.global_before, [self.clients[i] for i in keep],
                                 [self.payloads[i] for i in keep], [self.weights[i] for i in keep])


def _stem(directory: Path, server_round: int) -> Path:
    return directory / f"round-{server_round:04d}"


def save_round(directory: Path, contribution: RoundContribution, strategy_name: str) -> int:
    """Write one round (atomic per file: temp name, then rename); the bytes it takes on disk."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = _stem(directory, contribution.round)
    tensors = {GLOBAL_PREFIX + k: np.ascontiguousarray(v) for k, v in contribution.global_before.items()}
    for i, payload in enumerate(contribution.payloads):
        tensors.update({f"{i}/{k}": np.ascontiguousarray(v) for k, v in payload.items()})
    tmp = stem.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"round": str(contribution.round)})
    os.replace(tmp, stem.with_suffix(".safetensors"))
    tensor_bytes = stem.with_suffix(".safetensors").stat().st_size
    manifest = {"round": contribution.round, "strategy": strategy_name, "clients": contribution.clients,
                "weights": contribution.weights, "order": list(contribution.global_before),
                "bytes": tensor_bytes}
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, stem.with_suffix(".json"))
    return tensor_bytes + stem.with_suffix(".json").stat().st_size


def load_history(run_dir: Path) -> list[RoundContribution]:
    """Every stored round of RUN_DIR in order; ConfigError (naming the key to set) if the history is absent or
    has gaps, since an exact route needs every round from the client's first participation on."""
    run_dir = Path(run_dir)
    directory = run_dir / CONTRIBUTIONS
    manifests = sorted(directory.glob("round-*.json")) if directory.is_dir() else []
    if not manifests:
        raise ConfigError(f"{run_dir} has no stored client contributions ({directory} is missing): exact unlearning "
                          f"needs the per-round history; run with store-contributions = true (or use the "
                          f"approximate route, python -m client.loku)")
    history = []
    for path in manifests:
        manifest = json.loads(path.read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        order = manifest["order"]  # safetensors stores tensors in its own order; the merges keep dict order
        payloads = []
        for i in range(len(manifest["clients"])):
            prefix = f"{i}/"
            payloads.append({k: tensors[prefix + k] for k in order if prefix + k in tensors})
        history.append(RoundContribution(int(manifest["round"]), {k: tensors[GLOBAL_PREFIX + k] for k in order},
                                         [str(c) for c in manifest["clients"]], payloads,
                                         [float(w) for w in manifest["weights"]]))
    rounds = [c.round for c in history]
    missing = sorted(set(range(1, max(rounds) + 1)) - set(rounds))
    if missing:
        raise ConfigError(f"{directory} lacks rounds {', '.join(map(str, missing))}: the history is incomplete "
                          f"(was store-contributions = true for the whole run?); exact unlearning is not possible")
    return history


class StoresContributions:
    """Mixin: put before a linear LoRAStrategy in the bases (see `with_stored_contributions`)."""

    contribution_bytes: dict[int, int]

    def aggregate_payloads(self, payloads, weights, nodes, server_round):
        clients = [self.node_clients.get(node, str(node)) for node in nodes]
        contribution = RoundContribution(server_round, dict(self.global_arrays), clients, list(payloads),
                                         [float(w) for w in weights])
        self._store(contribution)
        return super().aggregate_payloads(payloads, weights, nodes, server_round)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if server_round not in getattr(self, "contribution_bytes", {}):  # the round aggregated nothing: say so on disk
            self._store(RoundContribution(server_round, dict(self.global_arrays), [], [], []))
        return arrays, metrics

    def _store(self, contribution: RoundContribution) -> None:
        if not hasattr(self, "contribution_bytes"):
            self.contribution_bytes = {}
        size = save_round(Path(self.run_dir) / CONTRIBUTIONS, contribution, type(self).__name__)
        self.contribution_bytes[contribution.round] = size
        log.info("round %d: stored the contributions of %d clients (%.2f MiB; %.2f MiB in all so far)",
                 contribution.round, len(contribution.clients), size / 2**20,
                 sum(self.contribution_bytes.values()) / 2**20)

    def contribution_summary(self) -> dict:
        """What metrics.json records: bytes per round and in all (read from disk: a resumed run counts every round)."""
        return contribution_summary(Path(self.run_dir))


def contribution_summary(run_dir: Path) -> dict:
    """Bytes of the stored history per round and in all."""
    sizes = {}
    for path in sorted((Path(run_dir) / CONTRIBUTIONS).glob("round-*.json")):
        sizes[int(path.stem.split("-")[1])] = path.stat().st_size + path.with_suffix(".safetensors").stat().st_size
    return {"directory": CONTRIBUTIONS, "bytes-per-round": {str(r): b for r, b in sorted(sizes.items())},
            "total-bytes": int(sum(sizes.values()))}


def with_stored_contributions(cls: type[LoRAStrategy]) -> type[LoRAStrategy]:
    """`cls` storing every round's contributions; ConfigError where re-aggregating a round would not be exact."""
    from server.strategies import STRATEGIES
    from server.strategies.user_dp import UserLevelDP, is_linear

    if not is_linear(cls) or issubclass(cls, UserLevelDP):
        linear = sorted(name for name, c in STRATEGIES.items() if is_linear(c) and not c.personal_factors)
        name = next((n for n, c in STRATEGIES.items() if c is cls), cls.__name__)
        why = ("adds server-side noise (user-level DP) that is not stored" if issubclass(cls, UserLevelDP)
               else "is not a weighted mean of the client payloads")
        raise ConfigError(f"store-contributions = true needs a linear strategy without user-level DP; {name!r} {why}: "
                          f"use {', '.join(linear)} with user-clip-norm = 0, or set store-contributions = false")
    return type(f"Storing{cls.__name__}", (StoresContributions, cls), {})
