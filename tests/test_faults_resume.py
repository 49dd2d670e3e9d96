"""A ServerApp killed mid-run and started again on the same run dir resumes from its last checkpoint and ends
exactly as a run that never crashed: the same global arrays, metrics, and client ledgers (no step lost, none
counted twice). A damaged checkpoint, or one of other settings, is refused, never silently replaced.

The clients here are in-process fakes behind a Grid's two methods: deterministic replies computed from what
they receive, real Flower messages, real on-disk ledgers. The real multi-process kill is in
tests/test_e2e_resume.py (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from safetensors.numpy import load_file

from common.config import RunConfig
from common.errors import CheckpointError
from common.payload import from_record, to_record
from common.privacy import PrivacyLedger, PrivacyStep
from server.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from server.server_app import run
from server.strategies import STRATEGIES
from server.strategies.base import factor_of
from tests.conftest import write_toy_csv
from tests.test_strategies import task_identity  # noqa: F401  (fixture: Flower's task identity)

pytestmark = pytest.mark.faults

LAYER = "bert.encoder.layer.0.attention.self.query"
A, B, HEAD = f"{LAYER}.lora_A.weight", f"{LAYER}.lora_B.weight", "classifier.weight"
R_MAX, D_IN, D_OUT = 4, 12, 10
NODE_RANKS = {101: 2, 102: 3, 103: 4, 104: 4}  # node id -> declared rank (rank-heterogeneous strategies)
ROUNDS = 3


class ServerKilled(BaseException):
    """The ServerApp process dies here (BaseException: nothing in the server may catch it)."""


class FakeFederation:
    """Clients behind `get_node_ids` and `send_and_receive`: each reply is a function of (client, round, what
    it received); each training round is counted in the client's PrivacyLedger file under `ledger_dir`.

    `kill_at_round`: the server dies when it sends that round's training instructions (before any client
    trains it), as if killed right after the previous round's checkpoint."""

    def __init__(self, ledger_dir, kill_at_round: int | None = None):
        self.ledger_dir, self.kill_at_round = ledger_dir, kill_at_round
        self.trained_rounds: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(NODE_RANKS)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            kind = msg.metadata.message_type
            if kind == MessageType.TRAIN:
                replies.append(self.train(msg))
            elif kind == MessageType.QUERY:
                client = str(msg.metadata.dst_node_id)
                replies.append(Message(content=RecordDict({
                    "privacy": ConfigRecord({"client-id": client}),
                    "adapter": ConfigRecord({"name": "lora", "rank": NODE_RANKS[msg.metadata.dst_node_id]})}),
                    reply_to=msg))
            else:
                seen = sum(float(np.sum(v)) for v in from_record(msg.content["arrays"]).values())
                replies.append(Message(content=RecordDict({"metrics": MetricRecord(
                    {"num-examples": 5, "eval-loss": abs(seen) % 3.0, "eval-accuracy": 0.5})}), reply_to=msg))
        return replies

    def train(self, msg: Message) -> Message:
        config, node = msg.content["config"], msg.metadata.dst_node_id
        server_round, client = int(config["server-round"]), str(node)
        if server_round == self.kill_at_round:
            raise ServerKilled(f"killed before round {server_round}")
        self.trained_rounds.append(server_round)
        frozen = set(filter(None, str(config["frozen"]).split(",")))
        update = {}
        for key, value in from_record(msg.content["arrays"]).items():
            rng = np.random.default_rng([node, server_round, sum(key.encode())])
            factor = factor_of(key)
            if factor in frozen:
                continue
            if config["fold"] and factor:  # FLoRA: a fresh LoRA of the client's rank
                rank = int(config["rank"])
                value = np.zeros((rank, D_IN) if factor == "lora_A" else (D_OUT, rank))
            update[key] = (value + 0.1 * rng.normal(size=value.shape)).astype(np.float32)
        ledger = PrivacyLedger(self.ledger_dir / f"client-{client}.json", client, 1e6, 1e-5)
        ledger.open_round(PrivacyStep(server_round, 1.0, 0.1, 2))
        for _ in range(2):
            ledger.count_step()
        ledger.close_round(2)
        return Message(content=RecordDict({
            "arrays": to_record(update),
            "metrics": MetricRecord({"num-examples": 10 + node % 7, "train-loss": 1.0, "first-loss": 2.0,
                                     "epsilon": ledger.epsilon(), "refused": 0, "steps": 2}),
            "privacy": ConfigRecord({"client-id": client, "ledger": json.dumps(ledger.to_dict()), "reason": ""}),
            "adapter": ConfigRecord({"name": "lora", "rank": int(config.get("rank", R_MAX))}),
        }), reply_to=msg)


def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {A: rng.normal(size=(R_MAX, D_IN)).astype(np.float32), B: rng.normal(size=(D_OUT, R_MAX)).astype(np.float32),
            HEAD: rng.normal(size=(3, D_IN)).astype(np.float32)}


def server_evaluation(server_round: int, arrays) -> MetricRecord:
    return MetricRecord({"accuracy": float(sum(np.sum(v) for v in from_record(arrays).values())), "loss": 1.0})


def settings(name: str) -> dict:
    return {"strategy": name, "rank": R_MAX, "clients-per-round": 3, "num-rounds": ROUNDS, "seed": 5,
            "hetlora-prune": 0.4 if name == "hetlora" else 0.0}


def strategy_run(name: str, run_dir, kill_at_round: int | None = None):
    """The wiring of server/server_app.py around `strategy.start`: resume from the checkpoint if there is one,
    write a checkpoint after every round. Returns (strategy, result, the federation)."""
    config = RunConfig.from_flower(settings(name))
    strategy = STRATEGIES[name].from_config(config, str(run_dir))
    federation = FakeFederation(run_dir, kill_at_round)
    checkpoint, resume, initial = load_checkpoint(run_dir, settings(name)), {}, global_state()
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint.strategy_state, checkpoint.strategy_arrays)
        initial = checkpoint.arrays
        resume = {"first_round": checkpoint.round + 1, "result": checkpoint.result}
    result = strategy.start(
        grid=federation, initial_arrays=to_record(initial), num_rounds=ROUNDS, evaluate_fn=server_evaluation,
        after_round=lambda rnd, arrays, res: save_checkpoint(run_dir, rnd, from_record(arrays), strategy, res,
                                                             settings(name)), **resume)
    return strategy, result, federation


def ledgers_on_disk(run_dir) -> dict[str, list]:
    return {p.name: json.loads(p.read_text())["history"] for p in sorted(run_dir.glob("client-*.json"))}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_resumed_run_ends_as_an_uninterrupted_one(name, tmp_path):
    straight, straight_result, _ = strategy_run(name, tmp_path / "straight")
    with pytest.raises(ServerKilled):
        strategy_run(name, tmp_path / "crashed", kill_at_round=2)
    assert load_checkpoint(tmp_path / "crashed", settings(name)).round == 1
    resumed, resumed_result, federation = strategy_run(name, tmp_path / "crashed")
    assert set(federation.trained_rounds) == {2, 3}  # round 1 was not sent again

    final, expected = from_record(resumed_result.arrays), from_record(straight_result.arrays)
    assert final.keys() == expected.keys() and all(np.array_equal(final[k], expected[k]) for k in expected)
    for attr in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
        assert getattr(resumed_result, attr) == getattr(straight_result, attr), attr
    assert sorted(resumed_result.evaluate_metrics_serverapp) == [0, 1, 2, 3]
    assert ledgers_on_disk(tmp_path / "crashed") == ledgers_on_disk(tmp_path / "straight")
    assert resumed.ledgers == straight.ledgers and resumed.faults == straight.faults
    assert resumed.refusals == straight.refusals
    assert resumed.client_adapters.keys() == straight.client_adapters.keys()
    if straight.rank_heterogeneous:
        assert resumed.node_ranks == straight.node_ranks
    if name == "hetlora":  # the pruning state crossed the restart: some node trains a lower rank than declared
        assert any(resumed.node_ranks[n] < NODE_RANKS[n] for n in resumed.node_ranks)


def test_the_checkpoint_round_trip_equals_the_state(tmp_path):
    strategy, result, _ = strategy_run("hetlora", tmp_path)
    checkpoint = load_checkpoint(tmp_path, settings("hetlora"))
    state, arrays = strategy.state_dict()
    assert checkpoint.round == ROUNDS and checkpoint.strategy_state == json.loads(json.dumps(state))
    assert checkpoint.strategy_arrays.keys() == arrays.keys()
    assert all(np.array_equal(checkpoint.strategy_arrays[k], arrays[k]) for k in arrays)
    assert all(np.array_equal(checkpoint.arrays[k], v) for k, v in from_record(result.arrays).items())
    assert checkpoint.result.train_metrics_clientapp == result.train_metrics_clientapp
    restored = STRATEGIES["hetlora"].from_config(RunConfig.from_flower(settings("hetlora")), str(tmp_path))
    restored.load_state_dict(checkpoint.strategy_state, checkpoint.strategy_arrays)
    assert restored.node_ranks == strategy.node_ranks and restored.ledgers == strategy.ledgers
    assert {c: w for c, (_, w) in restored.client_adapters.items()} == \
           {c: w for c, (_, w) in strategy.client_adapters.items()}
    for client, (payload, _) in strategy.client_adapters.items():
        assert all(np.array_equal(restored.client_adapters[client][0][k], v) for k, v in payload.items())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(CHECKPOINT)) == [CHECKPOINT]


@pytest.fixture
def checkpointed(tmp_path):
    strategy_run("fedsvd", tmp_path, kill_at_round=None)
    return tmp_path / CHECKPOINT


@pytest.mark.parametrize("name", ["state.json", "global.safetensors", "clients.safetensors"])
def test_a_truncated_or_corrupted_checkpoint_is_refused(checkpointed, name):
    path = checkpointed / name
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], data[:-1], data[:40] + bytes([data[40] ^ 1]) + data[41:], b""):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=f"server checkpoint {checkpointed} .*cannot be resumed.*delete "
                                                  f"{checkpointed} to start this run again from round 0"):
            load_checkpoint(checkpointed.parent, settings("fedsvd"))
    path.unlink()
    with pytest.raises(CheckpointError, match=f"has no {name}"):
        load_checkpoint(checkpointed.parent, settings("fedsvd"))


def test_a_checkpoint_of_other_settings_is_refused(checkpointed):
    other = {**settings("fedsvd"), "num-rounds": 5, "run-dir": "/elsewhere"}  # run-dir may differ, nothing else
    with pytest.raises(CheckpointError, match=r"other settings \(num-rounds 3 -> 5\).*use a new run-dir"):
        load_checkpoint(checkpointed.parent, other)


def test_a_key_added_after_the_run_matches_at_its_default_only(checkpointed):
    """Upgrading fedlora (a new run-config key, saved settings without it) must not orphan a run directory."""
    assert load_checkpoint(checkpointed.parent, {**settings("fedsvd"), "unlearn-route": "exact"}) is not None
    with pytest.raises(CheckpointError, match=r"other settings \(unlearn-route None -> 'loku'\)"):
        load_checkpoint(checkpointed.parent, {**settings("fedsvd"), "unlearn-route": "loku"})


def test_a_crash_between_the_two_renames_of_a_save_keeps_the_previous_checkpoint(checkpointed):
    run_dir = checkpointed.parent
    (run_dir / f"{CHECKPOINT}.new").mkdir()  # a save that died while writing the next one
    (run_dir / f"{CHECKPOINT}.new" / "state.json").write_text("{")
    checkpointed.rename(run_dir / f"{CHECKPOINT}.old")  # ... after moving the current one aside
    assert load_checkpoint(run_dir, settings("fedsvd")).round == ROUNDS


# ---- the ServerApp itself, on the real tiny model ------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_settings(tmp_path_factory):
    path = write_toy_csv(tmp_path_factory.mktemp("data"), per_class=10)  # a 3-example global test set
    return {"dataset": str(path), "examples-per-class": 0, "num-rounds": ROUNDS, "clients-per-round": 3,
            "local-steps": 2, "batch-size": 8, "max-seq-len": 16, "rank": 4, "strategy": "fedsvd"}


class ModelClients(FakeFederation):
    """The fake clients, answering with the keys of the real model (the received arrays, perturbed)."""

    def train(self, msg: Message) -> Message:
        reply = super().train(msg)
        received = from_record(msg.content["arrays"])
        frozen = set(filter(None, str(msg.content["config"]["frozen"]).split(",")))
        rng = np.random.default_rng(msg.metadata.dst_node_id)
        reply.content["arrays"] = to_record({k: (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype)
                                             for k, v in received.items() if factor_of(k) not in frozen})
        return reply


def server_app_run(toy_settings, run_dir, kill_at_round=None, **changes):
    run_config = {**toy_settings, "run-dir": str(run_dir), **changes}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    return run(ModelClients(run_dir / "ledgers", kill_at_round), context)


def test_the_server_app_resumes_and_its_report_combines_both_parts(toy_settings, tmp_path, server_log):
    straight = server_app_run(toy_settings, tmp_path / "straight")
    with pytest.raises(ServerKilled):
        server_app_run(toy_settings, tmp_path / "crashed", kill_at_round=2)
    with pytest.raises(CheckpointError, match="other settings"):
        server_app_run(toy_settings, tmp_path / "crashed", lr=0.5)
    resumed = server_app_run(toy_settings, tmp_path / "crashed")
    assert resumed == (tmp_path / "crashed").resolve()
    assert "resuming from round 1" in " ".join(r.getMessage() for r in server_log.records)

    before, after = (load_file(str(d / "adapter.safetensors")) for d in (straight, resumed))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (straight, resumed)]
    assert [row["round"] for row in metrics[1]["rounds"]] == [0, 1, 2, 3]
    assert metrics[1]["rounds"] == metrics[0]["rounds"]
    report = [json.loads((d / "privacy.json").read_text()) for d in (straight, resumed)]
    assert report[1]["clients"] == report[0]["clients"]
    rows = [row for client in report[1]["clients"] for row in client["history"]]
    assert sorted(row["round"] for row in rows) == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # 3 clients a round, each once
    assert all(row["steps"] == 2 for row in rows)
    restart = {"round": 2, "node": None, "client": None, "kind": "server-restart",
               "reason": "the ServerApp stopped after round 1 and was started again",
               "action": "resumed from the checkpoint of round 1"}
    assert report[1]["faults"] == report[0]["faults"] + [restart] == metrics[1]["faults"]
