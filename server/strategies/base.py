"""What the three LoRA strategies share: seeded sampling, what travels, reply checks, averaging.

Each strategy is a Flower `FedAvg` (Message API) and changes only what differs:
- `frozen_factors`: adapter factors clients keep fixed in a round and therefore do not send back;
- `static_factors`: factors every party rebuilds from the run seed, so the server never sends them;
- `personal_factors`: factors each client trains and keeps on its own disk, sent neither way (FedSA-LoRA's B);
- `after_averaging`: a post-processing step on the new global state (FedSVD's re-orthogonalization).
Everything here acts on the clients' DP outputs only: the server never sees raw data.

`start` is Flower's round loop made resumable (a `first_round` and an `after_round` hook), and
`state_dict` / `load_state_dict` are what server/checkpoint.py saves after every round.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from common.errors import ConfigError
from common.logs import get_logger
from common.low_rank_upload import decode as decode_low_rank, logical_keys
from common.payload import PayloadError, from_record, record_nbytes, to_record
from common.privacy import PrivacyStep
from server.aggregation import clip_update, weighted_mean

log = get_logger("server")

NODE_WAIT_SECONDS = 300.0
# What a training reply's metrics must carry for the round summary (see client/client_app.py).
REQUIRED_METRICS = ("num-examples", "train-loss", "first-loss", "epsilon")
MIB = 2**20
MAX_REASON_CHARS = 300  # a reason can quote client-chosen text (key names, error strings): keep logs bounded


def fault_options(config) -> dict:
    """The fault-tolerance settings of a run config (common.config.RunConfig) as strategy keywords."""
    return {"min_train_clients": config.min_train_clients, "max_update_norm": config.max_update_norm,
            "max_examples": config.max_examples, "max_reply_mb": config.max_reply_mb}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(text: str) -> str:
    """One bounded line: a hostile reason must not forge log lines (newlines) or flood the log."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def _weighted(values: list[float], weights: list[float]) -> float:
    """Example-weighted mean of a round's client metric (NaN for a round released with no replies)."""
    return float(np.average(values, weights=weights)) if values else math.nan


def factor_of(key: str) -> str:
    """`...query.lora_A.weight` -> `lora_A`; a head parameter has no factor ("")."""
    parts = key.split(".")
    return next((p for p in parts if p.startswith("lora_")), "")


class LoRAStrategy(FedAvg):
    """FedAvg over adapter tensors and the classifier head, example-weighted."""

    frozen_factors: tuple[str, ...] = ()
    static_factors: tuple[str, ...] = ()
    personal_factors: tuple[str, ...] = ()  # trained and kept by each client, never sent (fedsa_lora.py)
    required_factors: tuple[str, ...] = ()  # adapter factors the strategy's math needs
    adapters: tuple[str, ...] = ()  # the adapters it can merge; () = any with the required factors
    rank_heterogeneous = False  # can clients train different ranks (run config client-ranks)?
    secure_aggregation = True  # is the merge a weighted sum of the payloads (README table)?
    reorders_ranks = False  # does the merge re-factor or re-order the ranks (an SVD of B A, clustering)?
    releases_every_round = False  # user-level DP (user_dp.py): aggregate even with fewer valid replies

    def __init__(self, *, clients_per_round: int, seed: int, run_dir: str, adapter: str = "lora",
                 evaluate_clients: bool = True, min_train_clients: int = 1, max_update_norm: float = 0.0,
                 max_examples: int = 10_000_000, max_reply_mb: float = 512.0):
        """`min_train_clients`: fewer valid replies skip the round; `max_update_norm`: L2 bound on each
        client's update (0 = off); `max_examples`, `max_reply_mb`: larger claims or payloads are rejected."""
        if max_update_norm and self.rank_heterogeneous:
            raise ConfigError(
                f"max-update-norm = {max_update_norm:g} is not supported by the rank-heterogeneous strategy "
                f"{type(self).__name__}: its replies have other ranks than the global adapter, so 'reply minus "
                f"global' is undefined; set max-update-norm = 0 or use fedavg_lora, ffa_lora or fedsvd"
            )
        super().__init__(
            min_train_nodes=clients_per_round, min_available_nodes=clients_per_round,
            min_evaluate_nodes=clients_per_round, fraction_evaluate=1.0 if evaluate_clients else 0.0,
        )
        self.clients_per_round = clients_per_round
        self.adapter = adapter
        self.base_checksum = ""  # the server's frozen-base sha256; "" = replies' bases are not checked
        self.seed = seed
        self.run_dir = run_dir
        self.global_arrays: dict[str, np.ndarray] = {}
        self.ledgers: dict[str, dict] = {}
        self.refusals: dict[int, list[str]] = {}
        self.last_bytes_down = 0
        self.client_adapters: dict[str, tuple[dict[str, np.ndarray], float]] = {}  # last accepted reply, weight
        self.broadcast_keys: set[str] = set()  # frozen factors set before round 1 (server/adapter_init.py)
        self.min_train_clients = min_train_clients
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.max_reply_mb = max_reply_mb
        self.faults: list[dict] = []  # every fault seen: round, node, client, kind, reason, action
        self.sampled: dict[int, list[int]] = {}  # round -> nodes sent a training instruction
        self.node_clients: dict[int, str] = {}  # node id -> the client id its last readable reply gave
        self.trained_rounds: dict[str, list[int]] = {}  # client -> rounds it trained (report's ledger check)

    @classmethod
    def from_config(cls, config, run_dir: str) -> "LoRAStrategy":
        """The strategy a run config asks for (`config` is a common.config.RunConfig)."""
        return cls(clients_per_round=config.clients_per_round, seed=config.seed, run_dir=run_dir,
                   adapter=config.adapter, **fault_options(config))

    # ---- the round loop and its checkpointed state ---------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *,
              first_round: int = 1, result: Result | None = None,
              after_round: Callable[[int, ArrayRecord, Result], None] | None = None) -> Result:
        """Flower's `Strategy.start` loop (same steps, same order), able to continue a run.

        `first_round` > 1 resumes a run whose earlier rounds are in `result` (its `arrays` the global state
        after round first_round - 1) and whose strategy state was restored with `load_state_dict`: there is
        no round-0 evaluation, and rounds are numbered first_round..num_rounds as in an uninterrupted run,
        so the clients' ledgers and the seeded sampling see the same round numbers.
        `after_round(round, arrays, result)` runs once a round is complete (training, client evaluation,
        server evaluation): server/server_app.py writes the checkpoint there.
        """
        log.info("starting %s, rounds %d..%d", type(self).__name__, first_round, num_rounds)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        result = result or Result(arrays=initial_arrays)
        arrays = initial_arrays
        if first_round == 1 and evaluate_fn and (metrics := evaluate_fn(0, arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = metrics
        for current_round in range(first_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", current_round, num_rounds)
            replies = grid.send_and_receive(self.configure_train(current_round, arrays, train_config, grid),
                                            timeout=timeout)
            new_arrays, metrics = self.aggregate_train(current_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[current_round] = metrics
            replies = grid.send_and_receive(self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                                            timeout=timeout)
            if (metrics := self.aggregate_evaluate(current_round, replies)) is not None:
                result.evaluate_metrics_clientapp[current_round] = metrics
            if evaluate_fn and (metrics := evaluate_fn(current_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[current_round] = metrics
            if after_round is not None:
                after_round(current_round, arrays, result)
        return result

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What a resumed run needs besides the global arrays: (JSON-able state, the clients' last adapters).

        No RNG state: every random choice on the server (client sampling, randomized SVDs) is seeded by
        the run seed and the round number. `sampled` and `last_bytes_down` only live within a round.
        """
        order = sorted(self.client_adapters)
        arrays = {f"{i}/{key}": value for i, client in enumerate(order)
                  for key, value in self.client_adapters[client][0].items()}
        state = {"ledgers": self.ledgers, "faults": self.faults,
                 "refusals": {str(r): clients for r, clients in self.refusals.items()},
                 "node_clients": {str(node): client for node, client in self.node_clients.items()},
                 "broadcast_keys": sorted(self.broadcast_keys), "trained_rounds": self.trained_rounds,
                 "client_adapters": [[client, self.client_adapters[client][1]] for client in order]}
        return state, arrays

    def load_state_dict(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `state_dict`."""
        self.ledgers = dict(state["ledgers"])
        self.faults = list(state["faults"])
        self.refusals = {int(r): list(clients) for r, clients in state["refusals"].items()}
        self.node_clients = {int(node): client for node, client in state["node_clients"].items()}
        self.broadcast_keys = set(state["broadcast_keys"])
        self.trained_rounds = {client: list(rounds) for client, rounds in state.get("trained_rounds", {}).items()}
        self.client_adapters = {}
        for i, (client, weight) in enumerate(state["client_adapters"]):
            prefix = f"{i}/"
            self.client_adapters[client] = (
                {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, float(weight))

    # ---- what travels -------------------------------------------------------------------------
    def downlink(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The part of the global state sent to clients (static factors are rebuilt from the seed, personal
        ones stay on each client)."""
        return {k: v for k, v in arrays.items() if factor_of(k) not in (*self.static_factors, *self.personal_factors)}

    def uplink_keys(self) -> set[str]:
        """The keys a training reply must carry: everything the clients did not freeze."""
        return {k for k in self.global_arrays if factor_of(k) not in (*self.frozen_factors, *self.personal_factors)
                and k not in self.broadcast_keys}

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
        self.prepare_round(grid, nodes)
        return self.train_messages(server_round, nodes, config)

    def train_messages(self, server_round: int, nodes: list[int], config: ConfigRecord) -> list[Message]:
        """The round's training instruction to each of `nodes`, from the global in `self.global_arrays` (also
        what an unlearning replay sends its chosen nodes: server/unlearn_federated.py)."""
        config["server-round"] = server_round
        config["frozen"] = ",".join(self.frozen_factors)
        config["personal"] = ",".join(self.personal_factors)
        config["run-dir"] = self.run_dir
        config["fold"] = int(self.fold_global)
        down = self.downlink(self.global_arrays)
        messages, self.last_bytes_down = [], 0
        for node in nodes:
            sent = self.node_downlink(node, down)
            self.last_bytes_down += sum(v.nbytes for v in sent.values())
            record = RecordDict({"arrays": to_record(sent),
                                 "config": ConfigRecord({**dict(config), **self.node_config(node)})})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        self.sampled[server_round] = list(nodes)
        log.info("round %d: training on clients (node ids) %s", server_round, nodes)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, server_round, all_nodes=True)
        config["server-round"] = server_round
        config["run-dir"] = self.run_dir
        config["personal"] = ",".join(self.personal_factors)  # clients evaluate with their own personal factors
        record = RecordDict({"arrays": to_record(self.downlink(from_record(arrays))), "config": config})
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global state from the valid replies; every other reply is a fault, logged and skipped.

        Fewer than `min_train_clients` valid replies skip the round (Flower keeps the global arrays).
        """
        accepted, weights, metrics, senders, clients = [], [], [], [], []
        refused: list[str] = []
        bytes_up, rejected, faults_before = 0, 0, len(self.faults)
        replied: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            replied.add(node)
            if reply.has_error():
                reason = _short(str(reply.error.reason))
                log.warning("round %d: node %s failed: %s", server_round, node, reason)
                self.record_fault(server_round, node, self.node_clients.get(node), "error-reply", reason,
                                  "no update from this node this round")
                rejected += 1
                continue
            content = reply.content
            client, ledger, problem = self._read_privacy(content, str(node))
            reply_metrics = content.metric_records.get("metrics")
            if ledger is not None:
                trained_now = not problem and not (reply_metrics is not None and reply_metrics.get("refused", 0))
                gap = self._ledger_gap(client, ledger, server_round if trained_now else None)
                if gap:  # keep the longer ledger seen before: the report must not under-state what was spent
                    problem, ledger = gap, None
            if ledger is not None:
                self.ledgers[client] = ledger
                self.node_clients[node] = client
            if not problem and reply_metrics is not None and reply_metrics.get("refused", 0):
                refused.append(client)
                log.warning("round %d: client %s refused to train (%s)", server_round, client,
                            content["privacy"].get("reason", ""))
                continue
            if ledger is not None:  # it trained (even if its payload is rejected below): its ledger must say so
                self.trained_rounds.setdefault(client, []).append(server_round)
            payload, problem = ({}, problem) if problem else self._read_reply(content, node)
            problem = _short(problem)
            if problem:
                log.warning("round %d: rejected reply of client %s: %s", server_round, client, problem)
                self.record_fault(server_round, node, client, "malformed-reply", problem, "reply rejected")
                rejected += 1
                continue
            bytes_up += record_nbytes(content["arrays"])  # what travelled: factor pairs at their size
            if self.max_update_norm:
                payload = self._bound_update(payload, server_round, node, client)
            accepted.append(payload)
            weights.append(float(reply_metrics["num-examples"]))
            metrics.append(reply_metrics)
            senders.append(node)
            clients.append(client)
        for node in sorted(set(self.sampled.pop(server_round, [])) - replied):
            log.warning("round %d: node %s sent no reply", server_round, node)
            self.record_fault(server_round, node, self.node_clients.get(node), "no-reply",
                              "no reply before the round's timeout",
                              "no update from this node this round")
            rejected += 1
        self.refusals[server_round] = refused
        counts = {"clients-refused": len(refused), "clients-rejected": rejected}
        if len(accepted) < self.min_train_clients and not self.releases_every_round:
            self._skip_round(server_round, len(accepted), faulty=bool(accepted) or len(self.faults) > faults_before)
            return None, MetricRecord({"clients-trained": 0, **counts, "round-skipped": 1})
        new_global = self.aggregate_payloads(accepted, weights, senders, server_round)
        overflowed = sorted(k for k, v in new_global.items() if not np.all(np.isfinite(v)))
        if overflowed:  # finite but huge replies can still overflow the merge (e.g. FedSVD's Σ in float32)
            log.warning("round %d: the merged %s is not finite; round skipped, the global adapter is unchanged",
                        server_round, overflowed[0])
            self.record_fault(server_round, None, None, "round-skipped", f"the merged {overflowed[0]} is not "
                              f"finite (replies of clients {', '.join(clients)})", "round skipped; global adapter "
                              "unchanged (max-update-norm bounds what one client can send)")
            return None, MetricRecord({"clients-trained": 0, **counts, "round-skipped": 1})
        for client, payload, weight in zip(clients, accepted, weights):
            self.client_adapters[client] = (payload, weight)
        summary = {
            "clients-trained": len(accepted), **counts,
            "train-loss": _weighted([m["train-loss"] for m in metrics], weights),
            "first-loss": _weighted([m["first-loss"] for m in metrics], weights),
            "epsilon-max": float(max((m["epsilon"] for m in metrics), default=0.0)),
            "bytes-up": int(bytes_up), "bytes-down": int(self.last_bytes_down),
        }
        return to_record(new_global), MetricRecord(summary)

    def _ledger_gap(self, client: str, ledger: dict, this_round: int | None) -> str:
        """Why a private client's ledger cannot be right, or "": it must hold a row for every round the server
        saw the client train, and for `this_round` if it trained now (a reset or trimmed ledger under-states)."""
        rows = {int(row["round"]) for row in ledger.get("history", [])}
        target = ledger.get("target_epsilon")
        if not rows and not (_is_number(target) and math.isfinite(target)):
            return ""  # trained without DP: no rows to keep
        needed = set(self.trained_rounds.get(client, ())) | ({this_round} if this_round is not None else set())
        missing = sorted(needed - rows)
        if not missing:
            return ""
        return (f"its ledger has no row for round(s) {', '.join(map(str, missing))} it trained: its epsilon would "
                "be under-stated")

    def record_fault(self, server_round: int, node: int | None, client: str | None, kind: str, reason: str,
                     action: str) -> None:
        """One row of the run's fault log (metrics.json and the privacy report list them all)."""
        self.faults.append({"round": server_round, "node": None if node is None else int(node), "client": client,
                            "kind": kind, "reason": reason, "action": action})

    def _skip_round(self, server_round: int, valid: int, faulty: bool) -> None:
        """Log why the round does not aggregate; a skip caused by faults (not only refusals) is a fault too."""
        if valid == 0:
            log.warning("round %d: no usable replies; the global adapter is unchanged", server_round)
        else:
            log.warning("round %d: only %d valid replies, fewer than min-train-clients = %d; round skipped, the "
                        "global adapter is unchanged", server_round, valid, self.min_train_clients)
        if faulty:
            self.record_fault(server_round, None, None, "round-skipped",
                              f"{valid} valid replies, min-train-clients = {self.min_train_clients}",
                              "round skipped; global adapter unchanged")

    def _bound_update(self, payload: dict[str, np.ndarray], server_round: int, node: int, client: str
                      ) -> dict[str, np.ndarray]:
        """The payload with its update (payload - global) clipped to `max_update_norm`, logged if clipped."""
        clipped, norm = clip_update(payload, self.global_arrays, self.max_update_norm)
        if norm > self.max_update_norm:
            log.warning("round %d: clipped the update of client %s from norm %.4g to max-update-norm = %g",
                        server_round, client, norm, self.max_update_norm)
            self.record_fault(server_round, node, client, "update-clipped",
                              f"update norm {norm:.4g} > max-update-norm = {self.max_update_norm:g}",
                              f"update scaled to norm {self.max_update_norm:g}")
        return clipped

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _read_privacy(content: RecordDict, node: str) -> tuple[str, dict | None, str]:
        """(client id, its ledger, problem): the `privacy` record every reply must carry."""
        privacy = content.config_records.get("privacy")
        if privacy is None or "client-id" not in privacy:
            return node, None, "no privacy record with a client-id"
        client = _short(str(privacy["client-id"]))
        try:
            ledger = json.loads(str(privacy.get("ledger", "")))
        except json.JSONDecodeError:
            return client, None, "its ledger is not valid JSON"
        try:
            for row in ledger["history"]:
                PrivacyStep.from_dict(row)
        except (TypeError, KeyError, ValueError) as err:
            return client, None, f"its ledger has no valid history ({str(err)[:200]})"
        return client, ledger, ""

    def _read_reply(self, content: RecordDict, node: int = 0) -> tuple[dict[str, np.ndarray], str]:
        """(payload, "") for a training reply that can be averaged, else ({}, why not).

        Cheap checks come first, so an oversized or mislabelled payload is refused before it is decoded.
        """
        trained = content.config_records.get("adapter", {}).get("name")
        if trained != self.adapter:
            return {}, f"it trained adapter {trained!r}, this run uses {self.adapter!r}"
        theirs = content.config_records.get("adapter", {}).get("base-sha256")
        if self.base_checksum and theirs != self.base_checksum:
            return {}, (f"it trained on a frozen base with checksum {str(theirs)[:16]!r}, the server built "
                        f"{self.base_checksum[:16]!r} (the same model, base settings and seed must give the same base)")
        if "metrics" not in content.metric_records:
            return {}, "no metrics"
        problem = self._check_metrics(content["metrics"])
        if problem:
            return {}, problem
        if "arrays" not in content.array_records:
            return {}, "no arrays"
        record = content["arrays"]
        size = sum(len(array.data) for array in record.values())
        if size > self.max_reply_mb * MIB:
            return {}, f"its arrays are {size / MIB:.1f} MiB, over max-reply-mb = {self.max_reply_mb:g}"
        expected = self.uplink_keys()
        sent = logical_keys(record)  # a low-rank factor pair stands for its matrix (common/low_rank_upload.py)
        if sent != expected:
            missing, extra = sorted(expected - sent), sorted(sent - expected)
            return {}, f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
        try:
            wire = from_record(record)
        except (ValueError, TypeError, EOFError, OSError) as err:  # bytes that are not what the header claims
            return {}, f"its arrays cannot be decoded ({type(err).__name__}: {str(err)[:80]})"
        try:
            payload = decode_low_rank(wire, self.global_arrays)
        except PayloadError as err:
            return {}, str(err)
        problem = self._check_shapes(payload, content, node)
        if problem:
            return {}, problem
        for key, value in payload.items():
            if not np.all(np.isfinite(value)):
                return {}, f"{key} contains NaN or Inf"
        return payload, ""

    def _check_metrics(self, metrics: MetricRecord) -> str:
        """The metrics a summary reads are numbers, and num-examples is a count this run believes."""
        missing = [k for k in REQUIRED_METRICS if k not in metrics]
        if missing:
            return f"metrics lack {', '.join(missing)}"
        not_numbers = [k for k in REQUIRED_METRICS if not _is_number(metrics[k])]
        if not_numbers:
            return f"metrics {', '.join(not_numbers)} are not numbers"
        examples = metrics["num-examples"]
        if not np.isfinite(examples) or examples != int(examples):
            return f"num-examples = {examples} is not a finite whole number"
        if examples <= 0:
            return f"num-examples = {examples}"
        if examples > self.max_examples:
            return f"num-examples = {examples} exceeds max-examples = {self.max_examples}"
        if not metrics["epsilon"] >= 0:  # inf (a non-private run) is fine, NaN is not
            return f"epsilon = {metrics['epsilon']} is not a number >= 0"
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
