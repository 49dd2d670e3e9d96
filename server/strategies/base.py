"""What the three LoRA strategies share: seeded sampling, what travels, reply checks, averaging.

Each strategy is a Flower `FedAvg` (Message API) and changes only what differs:
- `frozen_factors`: adapter factors clients keep fixed in a round and therefore do not send back;
- `static_factors`: factors every party rebuilds from the run seed, so the server never sends them;
- `after_averaging`: a post-processing step on the new global state (FedSVD's re-orthogonalization).
Everything here acts on the clients' DP outputs only: the server never sees raw data.
"""

from __future__ import annotations

import json
import random
import time
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.errors import ConfigError
from common.logs import get_logger
from common.payload import from_record, to_record
from common.privacy import PrivacyStep
from server.aggregation import weighted_mean

log = get_logger("server")

NODE_WAIT_SECONDS = 300.0
# What a training reply's metrics must carry for the round summary (see client/client_app.py).
REQUIRED_METRICS = ("num-examples", "train-loss", "first-loss", "epsilon")


def factor_of(key: str) -> str:
    """`...query.lora_A.weight` -> `lora_A`; a head parameter has no factor ("")."""
    parts = key.split(".")
    return next((p for p in parts if p.startswith("lora_")), "")


class LoRAStrategy(FedAvg):
    """FedAvg over adapter tensors and the classifier head, example-weighted."""

    frozen_factors: tuple[str, ...] = ()
    static_factors: tuple[str, ...] = ()
    required_factors: tuple[str, ...] = ()  # adapter factors the strategy's math needs
    adapters: tuple[str, ...] = ()  # the adapters it can merge; () = any with the required factors
    rank_heterogeneous = False  # can clients train different ranks (run config client-ranks)?
    secure_aggregation = True  # is the merge a weighted sum of the payloads (README table)?

    def __init__(self, *, clients_per_round: int, seed: int, run_dir: str, adapter: str = "lora",
                 evaluate_clients: bool = True):
        super().__init__(
            min_train_nodes=clients_per_round, min_available_nodes=clients_per_round,
            min_evaluate_nodes=clients_per_round, fraction_evaluate=1.0 if evaluate_clients else 0.0,
        )
        self.clients_per_round = clients_per_round
        self.adapter = adapter
        self.seed = seed
        self.run_dir = run_dir
        self.global_arrays: dict[str, np.ndarray] = {}
        self.ledgers: dict[str, dict] = {}
        self.refusals: dict[int, list[str]] = {}
        self.last_bytes_down = 0
        self.client_adapters: dict[str, tuple[dict[str, np.ndarray], float]] = {}  # last accepted reply, weight
        self.broadcast_keys: set[str] = set()  # frozen factors set before round 1 (server/adapter_init.py)

    @classmethod
    def from_config(cls, config, run_dir: str) -> "LoRAStrategy":
        """The strategy a run config asks for (`config` is a common.config.RunConfig)."""
        return cls(clients_per_round=config.clients_per_round, seed=config.seed, run_dir=run_dir,
                   adapter=config.adapter)

    # ---- what travels -------------------------------------------------------------------------
    def downlink(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The part of the global state sent to clients (static factors are rebuilt from the seed)."""
        return {k: v for k, v in arrays.items() if factor_of(k) not in self.static_factors}

    def uplink_keys(self) -> set[str]:
        """The keys a training reply must carry: everything the clients did not freeze."""
        return {k for k in self.global_arrays
                if factor_of(k) not in self.frozen_factors and k not in self.broadcast_keys}

    def after_averaging(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return arrays

    # ---- hooks of the rank-heterogeneous strategies (server/strategies/rank_hetero.py) ----------
    fold_global = False  # clients add the received LoRA to their base and train a fresh one (FLoRA)

    def prepare_round(self, grid: Grid, nodes: list[int]) -> None:
        """Anything to learn about the sampled nodes before sending (rank-heterogeneous: their ranks)."""

    def node_downlink(self, node: int, down: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What one node receives (the same for every node unless ranks differ)."""
        return down

    def node_config(self, node: int) -> dict:
        return {}

    def aggregate_payloads(self, payloads: list[dict[str, np.ndarray]], weights: list[float], nodes: list[int],
                           server_round: int) -> dict[str, np.ndarray]:
        """The new global state from the accepted payloads: example-weighted mean, then post-processing."""
        return self.after_averaging({**self.global_arrays, **weighted_mean(payloads, weights)})

    # ---- Flower hooks -------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        nodes = self._sample(grid, server_round)
        config["server-round"] = server_round
        config["frozen"] = ",".join(self.frozen_factors)
        config["run-dir"] = self.run_dir
        config["fold"] = int(self.fold_global)
        self.prepare_round(grid, nodes)
        down = self.downlink(self.global_arrays)
        messages, self.last_bytes_down = [], 0
        for node in nodes:
            sent = self.node_downlink(node, down)
            self.last_bytes_down += sum(v.nbytes for v in sent.values())
            record = RecordDict({"arrays": to_record(sent),
                                 "config": ConfigRecord({**dict(config), **self.node_config(node)})})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        log.info("round %d: training on clients (node ids) %s", server_round, nodes)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, server_round, all_nodes=True)
        config["server-round"] = server_round
        config["run-dir"] = self.run_dir
        record = RecordDict({"arrays": to_record(self.downlink(from_record(arrays))), "config": config})
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, weights, metrics, senders = [], [], [], []
        refused: list[str] = []
        bytes_up = 0
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: node %s failed: %s", server_round, reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            content = reply.content
            client, ledger, problem = self._read_privacy(content, str(reply.metadata.src_node_id))
            if ledger is not None:
                self.ledgers[client] = ledger
            reply_metrics = content.metric_records.get("metrics")
            if not problem and reply_metrics is not None and reply_metrics.get("refused", 0):
                refused.append(client)
                log.warning("round %d: client %s refused to train (%s)", server_round, client,
                            content["privacy"].get("reason", ""))
                continue
            problem = problem or self._check_reply(content, reply.metadata.src_node_id)
            if problem:
                log.warning("round %d: rejected reply of client %s: %s", server_round, client, problem)
                continue
            payload = from_record(content["arrays"])
            bytes_up += sum(v.nbytes for v in payload.values())
            accepted.append(payload)
            self.client_adapters[client] = (payload, float(reply_metrics["num-examples"]))
            weights.append(float(reply_metrics["num-examples"]))
            metrics.append(reply_metrics)
            senders.append(reply.metadata.src_node_id)
        self.refusals[server_round] = refused
        if not accepted:
            log.warning("round %d: no usable replies; the global adapter is unchanged", server_round)
            return None, MetricRecord({"clients-trained": 0, "clients-refused": len(refused)})
        new_global = self.aggregate_payloads(accepted, weights, senders, server_round)
        summary = {
            "clients-trained": len(accepted), "clients-refused": len(refused),
            "train-loss": float(np.average([m["train-loss"] for m in metrics], weights=weights)),
            "first-loss": float(np.average([m["first-loss"] for m in metrics], weights=weights)),
            "epsilon-max": float(max(m["epsilon"] for m in metrics)),
            "bytes-up": int(bytes_up), "bytes-down": int(self.last_bytes_down),
        }
        return to_record(new_global), MetricRecord(summary)

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _read_privacy(content: RecordDict, node: str) -> tuple[str, dict | None, str]:
        """(client id, its ledger, problem): the `privacy` record every reply must carry."""
        privacy = content.config_records.get("privacy")
        if privacy is None or "client-id" not in privacy:
            return node, None, "no privacy record with a client-id"
        client = str(privacy["client-id"])
        try:
            ledger = json.loads(str(privacy.get("ledger", "")))
        except json.JSONDecodeError:
            return client, None, "its ledger is not valid JSON"
        try:
            for row in ledger["history"]:
                PrivacyStep.from_dict(row)
        except (TypeError, KeyError, ValueError) as err:
            return client, None, f"its ledger has no valid history ({err})"
        return client, ledger, ""

    def _check_reply(self, content: RecordDict, node: int = 0) -> str:
        """Why a training reply cannot be averaged, or "" if it can."""
        trained = content.config_records.get("adapter", {}).get("name")
        if trained != self.adapter:
            return f"it trained adapter {trained!r}, this run uses {self.adapter!r}"
        if "metrics" not in content.metric_records:
            return "no metrics"
        missing = [k for k in REQUIRED_METRICS if k not in content["metrics"]]
        if missing:
            return f"metrics lack {', '.join(missing)}"
        if "arrays" not in content.array_records:
            return "no arrays"
        payload = from_record(content["arrays"])
        expected = self.uplink_keys()
        if set(payload) != expected:
            missing, extra = sorted(expected - set(payload)), sorted(set(payload) - expected)
            return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
        problem = self._check_shapes(payload, content, node)
        if problem:
            return problem
        for key, value in payload.items():
            if not np.all(np.isfinite(value)):
                return f"{key} contains NaN or Inf"
        examples = content["metrics"]["num-examples"]
        if not examples or examples <= 0:
            return f"num-examples = {examples}"
        return ""

    def _check_shapes(self, payload: dict[str, np.ndarray], content: RecordDict, node: int) -> str:
        """Every tensor has the global tensor's shape and dtype (rank-heterogeneous strategies relax this)."""
        for key, value in payload.items():
            reference = self.global_arrays[key]
            if value.shape != reference.shape or value.dtype != reference.dtype:
                return (f"{key} is {value.dtype}{list(value.shape)}, expected "
                        f"{reference.dtype}{list(reference.shape)}")
        return ""

    def _sample(self, grid: Grid, server_round: int, all_nodes: bool = False) -> list[int]:
        """Seeded choice of `clients_per_round` nodes, waiting (bounded) for enough to connect."""
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while len(nodes := sorted(grid.get_node_ids())) < self.clients_per_round:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"clients-per-round = {self.clients_per_round} but only {len(nodes)} nodes connected "
                    f"after {NODE_WAIT_SECONDS:.0f}s; lower clients-per-round or start more SuperNodes"
                )
            time.sleep(1.0)
        if all_nodes:
            return nodes
        return sorted(random.Random(self.seed * 100_003 + server_round).sample(nodes, self.clients_per_round))
