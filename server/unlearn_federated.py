"""Unlearning as a Flower run: the federation forgets one client of a finished run (deployment or simulation).

    flwr run . FED --run-config 'run-dir="RUN_DIR" unlearn-client="2"'                        # exact
    flwr run . FED --run-config 'run-dir="RUN_DIR" unlearn-client="2" unlearn-route="loku"'   # approximate

With `unlearn-client` set, the ServerApp does not train: it runs `run_unlearning` on RUN_DIR, a finished
run's directory on the server. Model, data, strategy and privacy settings all come from
RUN_DIR/run_config.json and travel with every instruction (`run-config`), so the clients train exactly as
that run did; the unlearning run itself sets only `unlearn-client`, `unlearn-route` and LoKU's
`unlearn-epsilon`, `loku-steps`, `loku-lr`.

- `exact`: the routes of server/unlearn.py on the stored history (`store-contributions = true`). A replay
  (the client contributed before the last round) is re-trained by the federation: each replayed round goes,
  as an ordinary training instruction, to the nodes of that round's other participants, found by asking
  every node who it is (a `query` message, answered without reading data). The replies are checked like a
  round's and bounded by `max-update-norm` as the run did. Exact needs every one of them: a participant
  that is not connected, fails or refuses (no budget left) stops the command with nothing written, rather
  than return a global that no run without the client would have reached.
- `loku`: the leaving client's node gets a `train.loku` instruction with the final global; it runs LoKU on
  its own data under DP-SGD, charged to its own ledger (client/loku.py), and replies an ordinary update,
  which the server checks like any reply and aggregates as the only reply of round num-rounds + 1.

Writes RUN_DIR/unlearn/client-<ID>/ as `python -m server.unlearn` does (record.json, adapter.safetensors),
with `via = "flower"`, the unlearned global's test accuracy and loss, and the ledgers of the clients that
trained for it (a ledger's rows are its epsilon's evidence).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from safetensors.numpy import load_file

from common.config import RunConfig, finished_run_config
from common.errors import ConfigError, FedloraError
from common.logs import get_logger
from common.payload import to_record
from server.checkpoint import load_checkpoint
from server.contributions import load_history
from server.strategies.base import LoRAStrategy
from server.unlearn import UnlearnResult, apply_update, exact_unlearn, strategy_for, write_result

log = get_logger("server")
LOKU_MESSAGE_TYPE = "train.loku"
# What an unlearning run may set itself; everything else is the finished run's.
UNLEARN_SETTINGS = ("unlearn_client", "unlearn_route", "unlearn_epsilon", "loku_steps", "loku_lr")
QUERY_TIMEOUT_SECONDS = 300.0
ROUND_TIMEOUT_SECONDS = 3600.0
NODE_WAIT_SECONDS = 120.0


def unlearning_config(finished: RunConfig, asked: RunConfig) -> RunConfig:
    """The finished run's settings with the unlearning run's own (UNLEARN_SETTINGS)."""
    return dataclasses.replace(finished, **{name: getattr(asked, name) for name in UNLEARN_SETTINGS})


def client_nodes(grid: Grid, wanted: set[str], wait: float | None = None) -> dict[str, int]:
    """{client id: node id} for `wanted`, asking each connected node who it is; waits up to `wait` seconds
    (default NODE_WAIT_SECONDS) for the wanted clients to connect, then names those still missing."""
    wait = NODE_WAIT_SECONDS if wait is None else wait
    found: dict[str, int] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + wait
    while True:
        new = [node for node in grid.get_node_ids() if node not in asked]
        messages = [Message(content=RecordDict({}), message_type=MessageType.QUERY, dst_node_id=node) for node in new]
        asked.update(new)
        for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT_SECONDS) if messages else []:
            privacy = None if reply.has_error() else reply.content.config_records.get("privacy")
            if privacy is not None and "client-id" in privacy:
                found[str(privacy["client-id"])] = reply.metadata.src_node_id
        if wanted <= set(found) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    missing = sorted(wanted - set(found))
    if missing:
        raise FedloraError(f"client(s) {', '.join(missing)} not connected after {wait:.0f} s (connected: "
                           f"{', '.join(sorted(found)) or 'none'}); start their SuperNodes and run the command again")
    return {client: found[client] for client in wanted}


class FederatedRetrain:
    """server/unlearn.py's RetrainRound over Flower: a replayed round's training instruction to the nodes of
    its clients, every reply checked as in a round; any missing, failed or refused reply stops the replay."""

    def __init__(self, grid: Grid, config: RunConfig, strategy: LoRAStrategy):
        self.grid, self.config, self.strategy = grid, config, strategy
        self.ledgers: dict[str, dict] = {}
        self.nodes: dict[str, int] = {}  # client id -> node id, asked once per client, not once per round

    def __call__(self, clients: list[str], arrays: dict[str, np.ndarray], server_round: int
                 ) -> list[tuple[dict[str, np.ndarray], float]]:
        unknown = set(clients) - set(self.nodes)
        if unknown:
            self.nodes.update(client_nodes(self.grid, unknown))
        nodes = self.nodes
        self.strategy.global_arrays = dict(arrays)
        settings = ConfigRecord({"run-config": json.dumps(self.config.to_flower(), default=str)})
        messages = self.strategy.train_messages(server_round, [nodes[c] for c in clients], settings)
        self.strategy.sampled.pop(server_round, None)
        log.info("unlearning: replaying round %d on clients %s", server_round, ", ".join(clients))
        replies = {reply.metadata.src_node_id: reply
                   for reply in self.grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_SECONDS)}
        return [self._payload(replies.get(nodes[client]), client, server_round) for client in clients]

    def _payload(self, reply: Message | None, client: str, server_round: int) -> tuple[dict[str, np.ndarray], float]:
        payload, weight, ledger = checked_update(self.strategy, reply, client, server_round, "replay of round")
        self.ledgers[client] = ledger
        if self.strategy.max_update_norm:  # as the run bounded (and stored) its payloads
            payload = self.strategy._bound_update(payload, server_round, reply.metadata.src_node_id, client)
        return payload, weight


def checked_update(strategy: LoRAStrategy, reply: Message | None, client: str, server_round: int, what: str
                   ) -> tuple[dict[str, np.ndarray], float, dict]:
    """(payload, example weight, ledger) of `client`'s reply, or FedloraError saying why it cannot be used."""
    where = f"{what} {server_round}: client {client}"
    if reply is None:
        raise FedloraError(f"{where} sent no reply before the timeout")
    if reply.has_error():
        raise FedloraError(f"{where} failed: {reply.error.reason}")
    sender, ledger, problem = strategy._read_privacy(reply.content, str(reply.metadata.src_node_id))
    if not problem and sender != client:
        problem = f"the reply is from client {sender}"
    metrics = reply.content.metric_records.get("metrics")
    if not problem and metrics is not None and metrics.get("refused", 0):
        problem = f"it refuses ({reply.content['privacy'].get('reason', '')}); an exact replay needs budget"
    if not problem:
        payload, problem = strategy._read_reply(reply.content, reply.metadata.src_node_id)
    if problem:
        raise FedloraError(f"{where}: {problem}")
    return payload, float(metrics["num-examples"]), ledger


def federated_loku(grid: Grid, config: RunConfig, run_dir: Path, strategy: LoRAStrategy
                   ) -> tuple[UnlearnResult, dict[str, dict], dict]:
    """The leaving client's LoKU round over Flower; (result, {client: ledger}, LoKU's metrics)."""
    client = config.unlearn_client
    loku_round = config.num_rounds + 1
    node = client_nodes(grid, {client})[client]
    global_arrays = load_file(str(run_dir / "adapter.safetensors"))
    strategy.global_arrays = dict(global_arrays)
    record = RecordDict({"arrays": to_record(strategy.downlink(global_arrays)), "config": ConfigRecord({
        "server-round": loku_round, "run-dir": str(run_dir), "unlearn-client": client,
        "run-config": json.dumps(config.to_flower(), default=str)})})
    log.info("unlearning: LoKU instruction to client %s (node %s)", client, node)
    replies = list(grid.send_and_receive([Message(content=record, message_type=LOKU_MESSAGE_TYPE, dst_node_id=node)],
                                         timeout=ROUND_TIMEOUT_SECONDS))
    payload, weight, ledger = checked_update(strategy, replies[0] if replies else None, client, loku_round,
                                             "LoKU round")
    arrays = apply_update(strategy, global_arrays, payload, weight, loku_round)
    metrics = dict(replies[0].content["metrics"])
    result = UnlearnResult(client, "approximate-loku", False, None, config.num_rounds, arrays=arrays,
                           note=f"client {client} ran LoKU on its own data ({int(metrics['steps'])} DP steps, "
                                f"epsilon {metrics['epsilon']:.3f}); its update was aggregated as the only reply of "
                                f"round {loku_round} (approximate: measure it with python -m simulations.unlearning)")
    return result, {client: ledger}, metrics


def run_unlearning(grid: Grid, asked: RunConfig) -> Path:
    """Forget `asked.unlearn_client` of the finished run in `asked.run_dir`; the output directory."""
    from server.server_app import GlobalEvaluator

    if not asked.run_dir:
        raise ConfigError("unlearn-client needs run-dir = the finished run's directory on the server")
    run_dir = Path(asked.run_dir).expanduser().resolve()
    finished = finished_run_config(run_dir, "adapter.safetensors")
    config = unlearning_config(finished, asked)
    strategy = strategy_for(config, run_dir)
    checkpoint = load_checkpoint(run_dir, finished.to_flower())
    if checkpoint is not None:  # e.g. the keys broadcast before round 1, which replies must not carry
        strategy.load_state_dict(checkpoint.strategy_state, checkpoint.strategy_arrays)
    log.info("unlearning client %s of %s (route %s)", config.unlearn_client, run_dir, config.unlearn_route)
    extra: dict = {"via": "flower"}
    if config.unlearn_route == "loku":
        result, ledgers, extra["loku"] = federated_loku(grid, config, run_dir, strategy)
    else:
        retrain = FederatedRetrain(grid, config, strategy)
        result = exact_unlearn(load_history(run_dir), config.unlearn_client, strategy, retrain)
        ledgers = retrain.ledgers
    extra["ledgers"] = ledgers
    if result.arrays is not None:
        metrics = GlobalEvaluator(config)(config.num_rounds + 1, to_record(result.arrays))
        extra["global-accuracy"], extra["global-loss"] = float(metrics["accuracy"]), float(metrics["loss"])
    out = write_result(run_dir, result, extra)
    log.info("unlearning: client %s, route %s (%s); %s", result.client, result.route,
             "exact" if result.exact else "approximate", result.note)
    log.info("unlearning: written %s", out)
    return out
