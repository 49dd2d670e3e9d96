"""The Flower ClientApp: Flower records in, `train_round` / `evaluate_round`, Flower records out."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.adapter_init import init_round
from client.loku import loku_round
from client.train_round import ClientIdentity, TrainOutcome, evaluate_round, train_round
from common.config import RunConfig
from common.errors import FedloraError
from common.logs import get_logger
from common.payload import from_record, to_record
from common.ranks import client_rank, config_for_rank

app = ClientApp()
log = get_logger("client")


def identity_of(context: Context, run_dir: str) -> ClientIdentity:
    """Client id = node-config `client-id`, else the partition id; the ledger sits under node-config
    `ledger-dir`, else the run dir."""
    node = context.node_config
    partition_id = int(node.get("partition-id", 0))
    ledger_dir = node.get("ledger-dir") or str(Path(run_dir) / "ledgers")
    return ClientIdentity(client_id=str(node.get("client-id", partition_id)), partition_id=partition_id,
                          num_partitions=int(node.get("num-partitions", 1)), ledger_dir=Path(str(ledger_dir)),
                          run_dir=run_dir)


def node_run_config(context: Context, settings: ConfigRecord | None = None) -> RunConfig:
    """The run config as this node applies it: node-config `dataset` (an organisation's own data file,
    deployment) replaces the run config's, so each organisation's data stays on its own node. An unlearning
    run's instructions carry the finished run's settings (`run-config`, JSON; server/unlearn_federated.py):
    a replayed or LoKU round trains as that run did, not with the unlearning run's defaults."""
    sent = settings.get("run-config") if settings is not None else None
    config = RunConfig.from_flower(json.loads(str(sent)) if sent else context.run_config)
    dataset = context.node_config.get("dataset")
    return dataclasses.replace(config, dataset=str(dataset)) if dataset else config


def factor_names(settings: ConfigRecord, key: str) -> tuple[str, ...]:
    """The instruction's comma-separated factor names (`frozen`, `personal`)."""
    return tuple(part for part in str(settings.get(key, "")).split(",") if part)


def layer_list(settings: ConfigRecord) -> tuple[int, ...] | None:
    """The instruction's `train-layers` (LISA / OwLore: "1,4"), or None when the server samples no layers."""
    if "train-layers" not in settings:
        return None
    try:
        return tuple(int(part) for part in str(settings["train-layers"]).split(",") if part)
    except ValueError:
        raise FedloraError(f"the server's train-layers {str(settings['train-layers'])[:80]!r} is not a list of "
                           f"layer numbers") from None


def error_reply(msg: Message, err: FedloraError) -> Message:
    """A user-facing error (a corrupted ledger, a bad data file) as one log line and an error reply:
    the server logs it as this node's fault, and nothing is trained or spent."""
    log.error("%s", err)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return train_reply(msg, context)
    except FedloraError as err:
        return error_reply(msg, err)


def train_reply(msg: Message, context: Context) -> Message:
    started = time.time()
    settings = msg.content["config"]
    config = node_run_config(context, settings)
    identity = identity_of(context, str(settings["run-dir"]))
    frozen = factor_names(settings, "frozen")
    # The server may ask for less than the client's own rank (HetLoRA's rank pruning), never for more.
    rank = min(client_rank(config, context.node_config, identity.partition_id), int(settings.get("rank", 10**9)))
    config = config_for_rank(config, rank)
    outcome = train_round(config, identity, from_record(msg.content["arrays"]), frozen,
                          int(settings["server-round"]), fold=bool(settings.get("fold", 0)),
                          personal=factor_names(settings, "personal"), train_layers=layer_list(settings))
    if outcome.refused:
        log.warning("client %s refuses round %s: %s", identity.client_id, settings["server-round"], outcome.reason)
    else:
        log.info("client %s round %s: %d DP steps in %.0f s, loss %.3f -> %.3f, epsilon %.3f",
                 identity.client_id, settings["server-round"], outcome.metrics["steps"], time.time() - started,
                 outcome.metrics["first-loss"], outcome.metrics["train-loss"], outcome.metrics["epsilon"])
    return reply(msg, config, identity, outcome)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """What a rank-heterogeneous server asks each node once: who it is and which rank it trains."""
    config = RunConfig.from_flower(context.run_config)
    identity = identity_of(context, ".")
    return Message(content=RecordDict({
        "privacy": ConfigRecord({"client-id": identity.client_id}),
        "adapter": ConfigRecord({"name": config.adapter,
                                 "rank": client_rank(config, context.node_config, identity.partition_id)}),
    }), reply_to=msg)


@app.train("adapter_init")
def adapter_init(msg: Message, context: Context) -> Message:
    """Round 0 of a private data-driven init: a DP gradient of the adapted layers' weights."""
    config = node_run_config(context)
    identity = identity_of(context, str(msg.content["config"]["run-dir"]))
    try:
        outcome = init_round(config, identity)
    except FedloraError as err:
        return error_reply(msg, err)
    log.info("client %s: init step, epsilon %.3f", identity.client_id, outcome.metrics["epsilon"])
    return reply(msg, config, identity, outcome)


@app.train("loku")
def loku(msg: Message, context: Context) -> Message:
    """The leaving client's LoKU round (server/unlearn_federated.py): forget this node's data under DP-SGD,
    charged to its own ledger, and reply the result as an ordinary update."""
    settings = msg.content["config"]
    try:
        config = node_run_config(context, settings)
        identity = identity_of(context, str(settings["run-dir"]))
        if identity.client_id != str(settings.get("unlearn-client", "")):
            raise FedloraError(f"LoKU was asked of client {settings.get('unlearn-client')!r}; this node is client "
                               f"{identity.client_id!r}")
        outcome = loku_round(config, identity.client_id, identity.partition_id, identity.num_partitions,
                             identity.ledger_dir, from_record(msg.content["arrays"]))
    except FedloraError as err:
        return error_reply(msg, err)
    m = outcome.metrics
    log.info("client %s: LoKU round %s, %d DP steps, IHL %.3f -> %.3f, epsilon %.3f of %g", identity.client_id,
             m["round"], m["steps"], m["first-loss"], m["train-loss"], m["epsilon"], m["epsilon-budget"])
    return reply(msg, config, identity, TrainOutcome(arrays=outcome.payload, metrics=m, ledger=outcome.ledger))


def reply(msg: Message, config: RunConfig, identity: ClientIdentity, outcome: TrainOutcome) -> Message:
    content = RecordDict({
        "metrics": MetricRecord(outcome.metrics),
        "privacy": ConfigRecord({"client-id": identity.client_id, "ledger": json.dumps(outcome.ledger),
                                 "reason": outcome.reason}),
        # the server rejects a payload of another adapter, or of a rank it did not expect
        # ... and one trained on another frozen base than its own (common/bases/checksum.py)
        "adapter": ConfigRecord({"name": config.adapter, "rank": config.rank,
                                 "base": config.base, "base-sha256": outcome.extra.get("base-sha256", "")}),
    })
    if not outcome.refused:
        content["arrays"] = to_record(outcome.arrays)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = node_run_config(context)
    settings = msg.content["config"]
    identity = identity_of(context, str(settings.get("run-dir", ".")))
    metrics = evaluate_round(config, identity, from_record(msg.content["arrays"]), factor_names(settings, "personal"))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
