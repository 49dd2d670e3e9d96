"""Before round 1: set the frozen factors of a data-initialized adapter (LoRA-SB; LoRA-GA) and broadcast them.

`init-data = "public"`: the server reads the gradient on its public split (no privacy cost).
`init-data = "private"`: every connected client returns one DP-SGD step's noisy gradient of the adapted
layers' full weights (charged to its ledger as round 0); the server averages them, example-weighted.
Either way the result is post-processed by the run's `gradient_init_of` into frozen factors (LoRA-SB's bases,
LoRA-GA's start B0, A0), which join the global state: the strategy sends them every round and never expects
them back, so every party (clients, the server's evaluation, a resumed server, export) has the same ones.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.adapters.registry import gradient_init_of
from common.config import RunConfig
from common.data.partition import public_split
from common.errors import FedloraError
from common.gradient_init import frozen_factors_from, public_gradients
from common.logs import get_logger
from common.model import AdaptedModel, pick_device
from common.payload import from_record
from common.tensors import encode
from server.aggregation import weighted_mean
from server.strategies.base import LoRAStrategy

log = get_logger("server")
INIT_MESSAGE_TYPE = "train.adapter_init"
INIT_TIMEOUT_SECONDS = 1800.0


def initial_frozen_factors(config: RunConfig, adapted: AdaptedModel, grid: Grid, strategy: LoRAStrategy
                           ) -> dict[str, np.ndarray]:
    """The data-initialized frozen factors of the run's adapter ({} for adapters without such an init)."""
    if gradient_init_of(config) is None:
        return {}
    if config.init_data == "public":
        data = public_split(config)
        log.info("adapter init: gradients on the server's public split (%d examples, no privacy cost)", len(data))
        gradients = public_gradients(copy.deepcopy(adapted.model), encode(adapted.tokenizer, data, config.max_seq_len),
                                     config.eval_batch_size, pick_device())
    else:
        gradients = private_gradients(config, adapted, grid, strategy)
    return frozen_factors_from(config, gradients)


def private_gradients(config: RunConfig, adapted: AdaptedModel, grid: Grid, strategy: LoRAStrategy
                      ) -> dict[str, torch.Tensor]:
    """Example-weighted mean of the clients' DP gradients; their ledgers join the strategy's."""
    shapes = {name: tuple(module.base.weight.shape) for name, module in adapted.model.named_modules()
              if name in adapted.adapted_modules}
    nodes = strategy._sample(grid, 0, all_nodes=True)
    log.info("adapter init: one DP step on the private data of clients (node ids) %s", nodes)
    record = RecordDict({"config": ConfigRecord({"server-round": 0, "run-dir": strategy.run_dir})})
    messages = [Message(content=record, message_type=INIT_MESSAGE_TYPE, dst_node_id=node) for node in nodes]
    payloads, weights, problems = [], [], []
    for reply in grid.send_and_receive(messages, timeout=INIT_TIMEOUT_SECONDS):
        if reply.has_error():
            log.warning("adapter init: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            problems.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        client, ledger, problem = strategy._read_privacy(reply.content, str(reply.metadata.src_node_id))
        if ledger is not None:
            strategy.ledgers[client] = ledger
        problem = problem or init_reply_problem(reply.content, config.adapter, shapes)
        if problem:
            log.warning("adapter init: rejected reply of client %s: %s", client, problem)
            problems.append(f"client {client}: {problem}")
            continue
        payloads.append(from_record(reply.content["arrays"]))
        weights.append(float(reply.content["metrics"]["num-examples"]))
    if not payloads:  # the first reason in the error: a budget or plan refusal is the same on every client
        first = f" ({' '.join(problems[0].split())[:300]})" if problems else ""  # client text: one bounded line
        raise FedloraError(f"adapter init: no client returned a usable gradient{first}; see the warnings above")
    return {name: torch.from_numpy(value) for name, value in weighted_mean(payloads, weights).items()}


def init_reply_problem(content: RecordDict, adapter: str, shapes: dict[str, tuple]) -> str:
    """Why an init reply cannot be used, or "" if it can."""
    if content.config_records.get("adapter", {}).get("name") != adapter:
        return f"it is not a reply for adapter {adapter!r}"
    metrics = content.metric_records.get("metrics")
    if metrics is None or metrics.get("refused", 0):
        return f"the client refused ({content.config_records.get('privacy', {}).get('reason', 'no metrics')})"
    if not metrics.get("num-examples", 0) > 0:
        return "num-examples is not positive"
    if "arrays" not in content.array_records:
        return "no arrays"
    arrays = from_record(content["arrays"])
    if set(arrays) != set(shapes):
        return f"layers differ from the model's adapted layers ({sorted(set(arrays) ^ set(shapes))[:3]})"
    for name, value in arrays.items():
        if value.shape != shapes[name] or not np.all(np.isfinite(value)):
            return f"{name} has shape {value.shape} (expected {shapes[name]}) or non-finite values"
    return ""
