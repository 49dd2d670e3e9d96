"""Malformed training replies: each is rejected with a log line naming the client and the reason, the round
aggregates the valid rest, and the fault log records what happened and what the server did."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, MetricRecord

from common.payload import from_record, to_record
from server.strategies.fedavg_lora import FedAvgLoRA
from tests.test_strategies import A, B, D, HEAD, RANK, client_update, reply, strategy_of, task_identity  # noqa: F401

pytestmark = pytest.mark.faults



def set_arrays(change):
    return lambda content, good: content.__setitem__("arrays", to_record(change(dict(good))))


def set_metric(name, value):
    return lambda content, good: content.__setitem__("metrics", MetricRecord({**content["metrics"], name: value}))


def set_raw_array(key, array):
    """Replace one tensor by an Array the client built by hand (its bytes need not match its header)."""
    def change(content, good):
        content["arrays"][key] = array
    return change


def set_ledger_history(rows):
    return lambda content, good: content["privacy"].__setitem__("ledger", json.dumps({"history": rows}))


GARBAGE = Array("float32", (4, D), "numpy.ndarray", b"\x93NUMPY garbage")
ROW = {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}
# (case, how the reply of client 3 is broken, the reason the server must give)
CASES = [
    ("wrong shape", set_arrays(lambda g: {**g, B: np.zeros((D + 1, RANK), np.float32)}),
     f"{B} is float32[{D + 1}, {RANK}], expected float32[{D}, {RANK}]"),
    ("wrong dtype", set_arrays(lambda g: {**g, HEAD: g[HEAD].astype(np.float64)}),
     f"{HEAD} is float64[4, {D}], expected float32[4, {D}]"),
    ("NaN", set_arrays(lambda g: {**g, HEAD: np.full((4, D), np.nan, np.float32)}), f"{HEAD} contains NaN or Inf"),
    ("Inf", set_arrays(lambda g: {**g, A: np.full((RANK, D), -np.inf, np.float32)}), f"{A} contains NaN or Inf"),
    ("missing key", set_arrays(lambda g: {k: v for k, v in g.items() if k != A}),
     f"keys differ (missing ['{A}'], unexpected [])"),
    ("extra key", set_arrays(lambda g: {**g, "bert.pooler.dense.weight": np.zeros((2, 2), np.float32)}),
     "keys differ (missing [], unexpected ['bert.pooler.dense.weight'])"),
    ("other adapter", lambda c, g: c.__setitem__("adapter", ConfigRecord({"name": "nola"})),
     "it trained adapter 'nola', this run uses 'lora'"),
    ("absurd examples", set_metric("num-examples", 10**12), "num-examples = 1000000000000 exceeds max-examples = 10000000"),
    ("NaN examples", set_metric("num-examples", float("nan")), "num-examples = nan is not a finite whole number"),
    ("Inf examples", set_metric("num-examples", float("inf")), "num-examples = inf is not a finite whole number"),
    ("fractional examples", set_metric("num-examples", 2.5), "num-examples = 2.5 is not a finite whole number"),
    ("negative examples", set_metric("num-examples", -5), "num-examples = -5"),
    ("examples as a list", set_metric("num-examples", [5, 5]), "metrics num-examples are not numbers"),
    ("NaN epsilon", set_metric("epsilon", float("nan")), "epsilon = nan is not a number >= 0"),
    ("undecodable bytes", set_raw_array(HEAD, GARBAGE), "its arrays cannot be decoded (ValueError: "),
    ("NaN ledger noise", set_ledger_history([{**ROW, "noise_multiplier": float("nan")}]),
     "its ledger has no valid history (non-finite value in "),
    ("infinite ledger steps", set_ledger_history([{**ROW, "steps": float("inf")}]), "its ledger has no valid history ("),
]


@pytest.mark.parametrize("case,change,reason", CASES, ids=[c[0] for c in CASES])
def test_a_malformed_reply_is_rejected_by_name_and_the_rest_aggregates(tmp_path, server_log, case, change, reason):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    before = {k: v.copy() for k, v in strategy.global_arrays.items()}
    good, other, hostile = (client_update(strategy, k) for k in range(3))
    bad = reply(3, hostile, 50)
    change(bad.content, hostile)
    arrays, metrics = strategy.aggregate_train(2, [reply(1, good, 10), bad, reply(2, other, 30)])

    out = from_record(arrays)
    for key in good:  # exactly the mean of the two valid replies: the hostile one has no weight at all
        np.testing.assert_allclose(out[key], 0.25 * good[key] + 0.75 * other[key], rtol=1e-6, atol=1e-7)
    assert metrics["clients-trained"] == 2 and metrics["clients-rejected"] == 1
    lines = [r.getMessage() for r in server_log.records if "rejected reply" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"round 2: rejected reply of client 3: {reason}")
    [fault] = strategy.faults
    assert fault["reason"].startswith(reason)
    assert {k: v for k, v in fault.items() if k != "reason"} == {
        "round": 2, "node": 3, "client": "3", "kind": "malformed-reply", "action": "reply rejected"}
    for key, value in before.items():  # the strategy's own copy of the global is never written into
        np.testing.assert_array_equal(strategy.global_arrays[key], value)


def test_a_payload_over_the_size_limit_is_refused_before_it_is_decoded(tmp_path, server_log):
    strategy = FedAvgLoRA(clients_per_round=2, seed=7, run_dir=str(tmp_path), max_reply_mb=1.0)
    strategy.global_arrays, strategy.last_bytes_down = strategy_of(FedAvgLoRA, tmp_path).global_arrays, 0
    good = client_update(strategy, 0)
    # right keys, one tensor 1.1 MiB: the size check answers before keys, shapes or values are looked at
    huge = {**good, HEAD: np.zeros((4, 72_000), np.float32)}
    size = sum(len(a.data) for a in to_record(huge).values())
    arrays, metrics = strategy.aggregate_train(1, [reply(1, good, 10), reply(5, huge, 10)])
    assert metrics["clients-trained"] == 1
    np.testing.assert_array_equal(from_record(arrays)[HEAD], good[HEAD])
    expected = f"round 1: rejected reply of client 5: its arrays are {size / 2**20:.1f} MiB, over max-reply-mb = 1"
    assert expected in [r.getMessage() for r in server_log.records]
    assert size / 2**20 == pytest.approx(1.1, abs=0.05)


def test_a_round_of_only_hostile_replies_keeps_the_global_and_is_logged_as_skipped(tmp_path, server_log):
    strategy = strategy_of(FedAvgLoRA, tmp_path)
    hostile = client_update(strategy, 0)
    nan = {**hostile, B: np.full((D, RANK), np.nan, np.float32)}
    arrays, metrics = strategy.aggregate_train(3, [reply(1, nan, 10), reply(2, hostile, 10**9)])
    assert arrays is None  # Flower keeps the previous global arrays
    assert metrics["clients-trained"] == 0 and metrics["clients-rejected"] == 2 and metrics["round-skipped"] == 1
    assert [(f["client"], f["kind"]) for f in strategy.faults] == [
        ("1", "malformed-reply"), ("2", "malformed-reply"), (None, "round-skipped")]
    assert "round 3: no usable replies; the global adapter is unchanged" in [r.getMessage() for r in server_log.records]
    assert strategy.client_adapters == {}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_merge_that_overflows_float32_is_not_applied(tmp_path, server_log):
    """Finite replies can still overflow the merge: FedSVD's new B = U_r Σ_r, and Σ of a B full of 3e38
    times an A of unit-norm rows is far above float32's maximum (3.4e38)."""
    from server.strategies.fedsvd import FedSVD

    strategy = strategy_of(FedSVD, tmp_path)
    big = {k: np.full(v.shape, 3e38, np.float32) for k, v in client_update(strategy, 0).items()}
    arrays, metrics = strategy.aggregate_train(1, [reply(1, big, 10), reply(2, big, 10)])
    assert arrays is None and metrics["round-skipped"] == 1
    [fault] = strategy.faults
    assert fault["kind"] == "round-skipped" and fault["reason"].startswith(f"the merged {B} is not finite")
