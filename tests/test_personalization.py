"""Personalization: FedSA-LoRA's personal B (strategy, client round) and the local personal adapter after a run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import ConfigRecord
from safetensors.numpy import load_file, save_file

from client.personal_state import read_personal
from client.personalize import main as personalize_main
from client.personalize import personalized_model
from client.train_round import ClientIdentity, evaluate_round, train_round
from common.config import RunConfig
from common.errors import ConfigError
from common.payload import from_record, to_record, trainable_state
from server.strategies import STRATEGIES, check_compatible
from server.strategies.fedsa_lora import FedSALoRA
from server.strategies.user_dp import is_linear, with_user_level_dp
from tests.conftest import write_toy_csv
from tests.test_strategies import A, B, HEAD, global_state, grid, reply, strategy_of, task_identity  # noqa: F401


# ---- the strategy, on Flower messages ----------------------------------------------------------------------

def test_fedsa_b_travels_neither_way(tmp_path, grid):  # noqa: F811
    strategy = FedSALoRA(clients_per_round=2, seed=7, run_dir=str(tmp_path))
    start = global_state()
    messages = list(strategy.configure_train(1, to_record(start), ConfigRecord({}), grid))
    assert strategy.uplink_keys() == {A, HEAD}
    for message in messages:
        assert set(message.content["arrays"]) == {A, HEAD}
        assert message.content["config"]["personal"] == "lora_B" and message.content["config"]["frozen"] == ""
    assert strategy.last_bytes_down == 2 * (start[A].nbytes + start[HEAD].nbytes)
    evaluations = list(strategy.configure_evaluate(1, to_record(start), ConfigRecord({}), grid))
    assert evaluations and all(set(m.content["arrays"]) == {A, HEAD} for m in evaluations)
    assert all(m.content["config"]["personal"] == "lora_B" for m in evaluations)


def test_fedsa_averages_a_and_the_head_and_never_touches_b(tmp_path):
    strategy = strategy_of(FedSALoRA, tmp_path)
    start = dict(strategy.global_arrays)
    rng = np.random.default_rng(3)
    updates = [{k: rng.normal(size=start[k].shape).astype(np.float32) for k in (A, HEAD)} for _ in range(2)]
    with_b = {**updates[1], B: start[B] + 1.0}  # a client that sends its personal B is rejected
    arrays, metrics = strategy.aggregate_train(1, [reply(1, updates[0], examples=1), reply(2, updates[1], examples=3),
                                                   reply(3, with_b, examples=5)])
    out = from_record(arrays)
    for key in (A, HEAD):
        np.testing.assert_allclose(out[key], (updates[0][key] + 3 * updates[1][key]) / 4, atol=1e-6)
    np.testing.assert_array_equal(out[B], start[B])
    assert metrics["clients-trained"] == 2 and metrics["clients-rejected"] == 1
    assert "unexpected ['" + B in strategy.faults[0]["reason"]
    assert strategy.client_adapters == {}  # A without its B is not an adapter server.merge could use


def test_fedsa_refuses_what_it_cannot_do(tmp_path):
    assert STRATEGIES["fedsa_lora"] is FedSALoRA and is_linear(FedSALoRA)
    with_user_level_dp(FedSALoRA)  # linear in A and the head: user-level DP applies as for FedAvg
    check_compatible("fedsa_lora", "lora")
    with pytest.raises(ConfigError, match="client-ranks needs a rank-heterogeneous strategy, and 'fedsa_lora'"):
        check_compatible("fedsa_lora", "lora", (4, 8))
    with pytest.raises(ConfigError, match="merges adapter\\(s\\) lora only, not 'dora'"):
        check_compatible("fedsa_lora", "dora")
    for settings, match in [({"base": "lq_lora"}, "base = 'lq_lora' starts B on the server"),
                            ({"base": "nf4", "base-init": "eora"}, "base-init = 'eora' starts B on the server"),
                            ({"store-contributions": True}, "store-contributions = true cannot be combined")]:
        config = RunConfig.from_flower({"strategy": "fedsa_lora", **settings})
        with pytest.raises(ConfigError, match=match):
            FedSALoRA.from_config(config, str(tmp_path))
    assert FedSALoRA.from_config(RunConfig(strategy="fedsa_lora"), str(tmp_path)).personal_factors == ("lora_B",)


# ---- on the real model -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = write_toy_csv(tmp_path_factory.mktemp("data"))
    return RunConfig(dataset=str(path), examples_per_class=0, num_rounds=2, local_steps=2, batch_size=8,
                     max_seq_len=16, target_epsilon=4.0, rank=4, strategy="fedsa_lora", lr=0.05)


def test_a_client_keeps_its_own_b_across_rounds_and_never_sends_it(config, tmp_path):
    identity = ClientIdentity(client_id="0", partition_id=0, num_partitions=2, ledger_dir=tmp_path / "ledgers",
                              run_dir=str(tmp_path))
    start = trainable_state(personalized_model(config, {}, 3).model)
    down = {k: v for k, v in start.items() if ".lora_B." not in k}
    first = train_round(config, identity, down, (), server_round=1, personal=("lora_B",))
    assert first.arrays.keys() == down.keys()  # A and the head: no B in the reply
    saved = identity.personal_path
    assert saved.is_file() and saved.parent == identity.ledger_dir / "personal"
    b_after_1 = load_file(str(saved))
    assert b_after_1 and all(".lora_B." in k for k in b_after_1)
    assert max(np.abs(v).max() for v in b_after_1.values()) > 1e-3

    # round 2 at a negligible learning rate ends where it started: at round 1's B (not at B = 0)
    second = train_round(dataclasses.replace(config, lr=1e-9), identity, first.arrays, (), server_round=2,
                         personal=("lora_B",))
    assert second.arrays.keys() == down.keys()
    b_after_2 = load_file(str(saved))
    for key, value in b_after_1.items():
        np.testing.assert_allclose(b_after_2[key], value, atol=1e-6)
    assert [row["round"] for row in json.loads(identity.ledger_path.read_text())["history"]] == [1, 2]

    personal = evaluate_round(config, identity, second.arrays, ("lora_B",))
    shared_only = evaluate_round(config, identity, second.arrays)
    assert personal["num-examples"] == shared_only["num-examples"] > 0
    assert personal["eval-loss"] != shared_only["eval-loss"]  # evaluated with its own B, not B = 0
    assert read_personal(saved, str(tmp_path / "another-run")) is None  # a reused ledger dir: another run's B unused


def test_personalize_command_trains_a_private_adapter_and_charges_only_with_dp(config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    local = dataclasses.replace(config, strategy="fedsvd")
    (run_dir / "run_config.json").write_text(json.dumps(local.to_flower(), default=str))
    start = trainable_state(personalized_model(local, {}, 3).model)
    rng = np.random.default_rng(0)
    final = {k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()}
    save_file(final, str(run_dir / "adapter.safetensors"))

    personalize_main([str(run_dir), "--client", "1", "--num-clients", "2", "--steps", "3"])
    out = capsys.readouterr().out
    assert "no DP, nothing charged" in out and "local test accuracy" in out
    metrics = json.loads((run_dir / "personal" / "client-1.json").read_text())
    assert metrics["steps"] == 3 and not metrics["dp"] and 0 <= metrics["personal-accuracy"] <= 1
    assert not (run_dir / "ledgers").exists()  # nothing written to the ledger
    # the saved adapter on top of the folded global reproduces the personalized figures
    from common.data.partition import client_data
    from common.evaluation import evaluate
    from common.model import pick_device
    from common.tensors import encode

    adapted = personalized_model(local, final, 3, load_file(str(run_dir / "personal" / "client-1.safetensors")))
    test = encode(adapted.tokenizer, client_data(local, 1, 2).test, local.max_seq_len)
    loss, accuracy = evaluate(adapted.model, test, local.eval_batch_size, pick_device())
    assert accuracy == metrics["personal-accuracy"] and loss == pytest.approx(metrics["personal-loss"], rel=1e-5)

    personalize_main([str(run_dir), "--client", "1", "--num-clients", "2", "--steps", "2", "--dp"])
    metrics = json.loads((run_dir / "personal" / "client-1.json").read_text())
    ledger = json.loads((run_dir / "ledgers" / "client-1.json").read_text())
    assert metrics["dp"] and metrics["ledger-round"] == 3  # after the run's 2 rounds
    assert [(row["round"], row["steps"]) for row in ledger["history"]] == [(3, 2)]
    assert metrics["epsilon"] <= local.target_epsilon + 1.0 + 1e-6 and ledger["target_epsilon"] == 5.0


def test_personalize_refuses_what_it_cannot_fold(tmp_path):
    from client.personalize import check_personalizable

    with pytest.raises(ConfigError, match="adapter = 'lora' only"):
        check_personalizable(RunConfig(adapter="dora"))
    with pytest.raises(ConfigError, match="stores quantized"):
        check_personalizable(RunConfig(base="nf4"))
    with pytest.raises(SystemExit):
        personalize_main([str(tmp_path), "--client", "0", "--num-clients", "2"])  # not a finished run
