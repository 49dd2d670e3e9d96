"""Forget one client: the exact route from the stored history, or the approximate route's update (LoKU).

    python -m server.unlearn RUN_DIR --client ID                  # exact, needs store-contributions = true
    python -m server.unlearn RUN_DIR --client ID --replay-locally --num-clients N   # simulations: re-train
    python -m server.unlearn RUN_DIR --client ID --approximate RUN_DIR/unlearn/loku-client-ID.safetensors

Exact route (`exact_unlearn`), on the history of server/contributions.py. Let k be the first round whose
aggregate used the client's payload and R the last round:
- the client never contributed: the global is unchanged (route `not-a-contributor`);
- k = R (it joined in the last round): no later update was computed from a global it influenced, so
  re-aggregating round R from its stored start and the other clients' stored payloads is exactly round R
  without it (route `reaggregate-last-round`). For these linear strategies that is the same as subtracting
  its weighted payload from the round's weighted sum; it is recomputed from the stored payloads, which avoids
  the cancellation error of a subtraction;
- k < R: every update of rounds k+1..R was trained from a global the client influenced, so none of them can
  be kept. The exact route replays rounds k..R from the stored global before round k, re-training the
  clients that took part in each round except the leaving one (route `replay`). The server cannot re-train
  clients: the command writes that starting point and stops, unless `--replay-locally` (a simulation, where
  this machine holds every partition) re-trains them with `client.train_round`. A replay is new training on
  the remaining clients' data: its DP steps are charged to their ledgers, and a client whose budget is spent
  refuses (exact replay then needs budget, or a run with target-epsilon = inf).
"Exact" means the unlearned global has the distribution (the same value, with DP off and fixed seeds) of a
run in which the client never took part with the same participation of the others. The DP noise is seeded
from the OS, so with DP on the equality is in distribution, not bit for bit.

Approximate route: the leaving client runs LoKU on its own data (client/loku.py, charged to its ledger) and
its update is aggregated as the only reply of one more round (`apply_update`).

Outputs go to RUN_DIR/unlearn/client-<ID>/: `adapter.safetensors` (the unlearned global, if computed) or
`replay-start.safetensors`, and `record.json` (route, exactness, rounds, the reason).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from common.config import RunConfig, finished_run_config
from common.errors import ConfigError, FedloraError, exit_on_user_error
from server.contributions import RoundContribution, load_history
from server.strategies import get_strategy
from server.strategies.base import LoRAStrategy

# (the round's other clients, the global they start from, round) -> [(payload, example weight)] in that order:
# one call per replayed round, so a federation re-trains a round's clients in parallel (unlearn_federated.py)
RetrainRound = Callable[[list[str], dict[str, np.ndarray], int], list[tuple[dict[str, np.ndarray], float]]]


@dataclass
class UnlearnResult:
    client: str
    route: str
    exact: bool
    first_round: int | None
    last_round: int
    replayed_rounds: list[int] = field(default_factory=list)
    arrays: dict[str, np.ndarray] | None = None  # the unlearned global; None while a replay waits for clients
    start: dict[str, np.ndarray] | None = None  # the replay's starting global (before round first_round)
    note: str = ""

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("arrays", "start")}


def aggregate_round(strategy: LoRAStrategy, contribution: RoundContribution) -> dict[str, np.ndarray]:
    """The global after a stored round, recomputed with the strategy's own merge; a round with fewer payloads
    than min-train-clients is skipped, as the run would have skipped it (the global is unchanged)."""
    if len(contribution.payloads) < max(strategy.min_train_clients, 1):
        return dict(contribution.global_before)
    strategy.global_arrays = dict(contribution.global_before)
    return strategy.aggregate_payloads(contribution.payloads, contribution.weights,
                                       list(range(len(contribution.payloads))), contribution.round)


def exact_unlearn(history: list[RoundContribution], client: str, strategy: LoRAStrategy,
                  retrain: RetrainRound | None = None) -> UnlearnResult:
    """The global adapter without `client` (see the module docstring for the routes and when each is exact)."""
    last = history[-1].round
    rounds = [c.round for c in history if client in c.clients]
    if not rounds:
        return UnlearnResult(client, "not-a-contributor", True, None, last, arrays=aggregate_round(strategy, history[-1]),
                             note=f"client {client} contributed to no aggregate: the global is unchanged")
    first = rounds[0]
    if first == last:
        return UnlearnResult(client, "reaggregate-last-round", True, first, last,
                             arrays=aggregate_round(strategy, history[-1].without(client)),
                             note=f"client {client} contributed only to the last round {last}: re-aggregated it "
                                  "from the others' stored payloads")
    start = dict(history[first - 1].global_before)
    replayed = list(range(first, last + 1))
    if retrain is None:
        return UnlearnResult(client, "replay", False, first, last, replayed, start=start,
                             note=f"client {client} first contributed in round {first} < {last}: rounds "
                                  f"{first}..{last} must be re-trained without it from the stored global before "
                                  f"round {first} (--replay-locally in a simulation)")
    arrays = start
    for contribution in history[first - 1:]:
        others = [c for c in contribution.clients if c != client]
        replies = retrain(others, arrays, contribution.round) if others else []
        replay = RoundContribution(contribution.round, arrays, others, [p for p, _ in replies], [w for _, w in replies])
        arrays = aggregate_round(strategy, replay)
    return UnlearnResult(client, "replay", True, first, last, replayed, arrays=arrays,
                         note=f"rounds {first}..{last} re-trained without client {client} from the stored global "
                              f"before round {first}")


def apply_update(strategy: LoRAStrategy, global_arrays: dict[str, np.ndarray], payload: dict[str, np.ndarray],
                 weight: float, server_round: int) -> dict[str, np.ndarray]:
    """The global after one round whose only reply is `payload` (the approximate route's LoKU update)."""
    strategy.global_arrays = dict(global_arrays)
    expected = strategy.uplink_keys()
    if set(payload) != expected:
        missing, extra = sorted(expected - set(payload)), sorted(set(payload) - expected)
        raise ConfigError(f"the update's keys are not this run's uplink (missing {missing[:3]}, unexpected "
                          f"{extra[:3]}): was it computed for this run?")
    for key, value in payload.items():
        if value.shape != global_arrays[key].shape or not np.all(np.isfinite(value)):
            raise ConfigError(f"the update's {key} has shape {value.shape} (expected {global_arrays[key].shape}) "
                              "or is not finite")
    return strategy.aggregate_payloads([payload], [weight], [0], server_round)


def strategy_for(config: RunConfig, run_dir: Path) -> LoRAStrategy:
    """The run's strategy (its plain class: re-aggregating stores nothing) with the run's fault options."""
    return get_strategy(config.strategy).from_config(config, str(run_dir))


def run_config_of(run_dir: Path) -> RunConfig:
    return finished_run_config(run_dir)


def local_retrain(config: RunConfig, run_dir: Path, num_clients: int) -> RetrainRound:
    """Re-train a client's round with `client.train_round` on this machine (simulations only: the partitions
    are rebuilt from the seed); DP steps are charged to RUN_DIR/ledgers as a new execution of that round."""
    from client.train_round import ClientIdentity, train_round

    strategy = strategy_for(config, run_dir)

    def retrain_one(client: str, arrays: dict[str, np.ndarray], server_round: int):
        identity = ClientIdentity(client, int(client), num_clients, Path(run_dir) / "ledgers")
        outcome = train_round(config, identity, strategy.downlink(arrays), strategy.frozen_factors, server_round)
        if outcome.refused:
            raise FedloraError(f"replay of round {server_round}: client {client} refuses ({outcome.reason}); an "
                               "exact replay needs budget for the re-trained rounds")
        return outcome.arrays, float(outcome.metrics["num-examples"])

    return lambda clients, arrays, server_round: [retrain_one(c, arrays, server_round) for c in clients]


def write_result(run_dir: Path, result: UnlearnResult, extra: dict | None = None) -> Path:
    out = Path(run_dir) / "unlearn" / f"client-{result.client}"
    out.mkdir(parents=True, exist_ok=True)
    if result.arrays is not None:
        save_file(result.arrays, str(out / "adapter.safetensors"))
    if result.start is not None:
        save_file(result.start, str(out / "replay-start.safetensors"))
    record = {**result.record(), **(extra or {})}
    (out / "record.json").write_text(json.dumps(record, indent=2, default=_json_default))
    return out


def _json_default(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Forget one client of a finished run (exact or approximate).")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--client", required=True, help="client id (the partition id in simulations)")
    parser.add_argument("--replay-locally", action="store_true",
                        help="re-train the replayed rounds on this machine (simulations: needs --num-clients)")
    parser.add_argument("--num-clients", type=int, default=0, help="number of partitions of the simulation")
    parser.add_argument("--approximate", type=Path, metavar="UPDATE",
                        help="aggregate this LoKU update (python -m client.loku) as the only reply of one round")
    args = parser.parse_args(argv)
    config = run_config_of(args.run_dir)
    strategy = strategy_for(config, args.run_dir)
    if args.approximate:
        result = approximate(args.run_dir, config, strategy, args.client, args.approximate)
    else:
        retrain = None
        if args.replay_locally:
            if args.num_clients < 1:
                raise ConfigError("--replay-locally needs --num-clients (the simulation's number of partitions)")
            retrain = local_retrain(config, args.run_dir, args.num_clients)
        result = exact_unlearn(load_history(args.run_dir), args.client, strategy, retrain)
    out = write_result(args.run_dir, result)
    state = "exact" if result.exact else "approximate" if result.route.startswith("approximate") else "not done yet"
    print(f"client {result.client}: route {result.route} ({state}); "
          f"{result.note}")
    print(f"written: {out}")


def approximate(run_dir: Path, config: RunConfig, strategy: LoRAStrategy, client: str, update: Path) -> UnlearnResult:
    if not update.is_file():
        raise FedloraError(f"{update} not found: the leaving client writes it with python -m client.loku")
    meta_path = update.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    global_arrays = load_file(str(Path(run_dir) / "adapter.safetensors"))
    arrays = apply_update(strategy, global_arrays, load_file(str(update)), float(meta.get("num-examples", 1.0)),
                          config.num_rounds + 1)
    return UnlearnResult(client, "approximate-loku", False, None, config.num_rounds, arrays=arrays,
                         note=f"LoKU update of client {client} aggregated as the only reply of round "
                              f"{config.num_rounds + 1} (approximate: no guarantee the global equals one trained "
                              f"without it; measure it with python -m simulations.unlearning)")


if __name__ == "__main__":
    main()
