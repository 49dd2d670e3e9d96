"""An in-process federation for tests: a Grid's two methods in front of N nodes that answer with the real
ClientApp functions (no SuperLink), and the real ServerApp `run()` on it."""

from __future__ import annotations

from contextlib import contextmanager

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client import client_app

# message type -> the ClientApp function that answers it (client/client_app.py's decorators)
HANDLERS = {MessageType.TRAIN: client_app.train, MessageType.EVALUATE: client_app.evaluate,
            MessageType.QUERY: client_app.query, "train.adapter_init": client_app.adapter_init,
            "train.loku": client_app.loku}


class InProcessFederation:
    """Nodes 11, 12, ... holding partitions 0..N-1 of N; `sent` lists (message type, node) in send order."""

    def __init__(self, run_config: dict, num_nodes: int = 2, partitions: list[int] | None = None):
        partitions = list(range(num_nodes)) if partitions is None else partitions
        self.contexts = {11 + i: Context(run_id=1, node_id=11 + i,
                                         node_config={"partition-id": p, "num-partitions": num_nodes},
                                         state=RecordDict(), run_config=run_config)
                         for i, p in enumerate(partitions)}
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((msg.metadata.message_type, node))
            replies.append(HANDLERS[msg.metadata.message_type](msg, self.contexts[node]))
        return replies


@contextmanager
def server_identity():
    """The task identity Flower's Message constructor reads on the server side."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_server(grid: InProcessFederation, run_config: dict):
    """The real ServerApp `run()` on `grid`; what it returns (the run or unlearning directory)."""
    from server.server_app import run

    with server_identity():
        return run(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


class ServerKilled(BaseException):
    """The server process dying mid-run (a BaseException, so no `except Exception` in the server swallows it)."""


class CrashingFederation(InProcessFederation):
    """Kills the server (raises ServerKilled) when it sends round `kill_at_round`'s training instructions,
    until `kill` is set to False: the restart then resumes from the last checkpoint."""

    def __init__(self, run_config: dict, kill_at_round: int, **kwargs):
        super().__init__(run_config, **kwargs)
        self.kill_at_round, self.kill = kill_at_round, True

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        messages = list(messages)
        if self.kill and any(m.metadata.message_type == MessageType.TRAIN
                             and m.content["config"]["server-round"] == self.kill_at_round for m in messages):
            raise ServerKilled
        return super().send_and_receive(messages, timeout)
