"""Low-rank uploads of full-weight changes (GaLore on adapter `full`): factors rebuild the change exactly,
anything not of low rank goes dense, a broken pair is a rejected reply, and the real client sends factors."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
from common.low_rank_upload import U_SUFFIX, V_SUFFIX, change_factors, decode, encode, logical_keys, upload_rank
from common.payload import PayloadError

RNG = np.random.default_rng(0)


def test_a_rank_3_change_travels_as_two_thin_factors_and_is_rebuilt_to_float_rounding():
    start = {"w": RNG.standard_normal((40, 30)).astype(np.float32), "head": np.ones(3, np.float32)}
    change = (RNG.standard_normal((40, 3)) @ RNG.standard_normal((3, 30))).astype(np.float32)
    trained = {"w": start["w"] + change, "head": np.zeros(3, np.float32)}
    wire = encode(trained, start, rank=4, keys={"w"})
    assert set(wire) == {"w" + U_SUFFIX, "w" + V_SUFFIX, "head"} and logical_keys(wire) == {"w", "head"}
    assert wire["w" + U_SUFFIX].shape == (40, 4) and wire["w" + V_SUFFIX].shape == (4, 30)
    rebuilt = decode(wire, start)
    np.testing.assert_allclose(rebuilt["w"], trained["w"], atol=1e-5)
    np.testing.assert_array_equal(rebuilt["head"], trained["head"])


def test_a_change_of_higher_rank_or_one_that_would_not_shrink_goes_dense():
    assert change_factors(RNG.standard_normal((40, 30)).astype(np.float32), 4) is None  # full rank: dense
    assert change_factors(np.ones((4, 4), np.float32), 2) is None  # 2 x (4 + 4) >= 16 values: no saving
    assert change_factors(np.ones(10, np.float32), 1) is None  # not a matrix


@pytest.mark.parametrize("wire, fragment", [
    ({"w" + U_SUFFIX: np.zeros((40, 2), np.float32)}, "only one of its two low-rank factors"),
    ({"w" + U_SUFFIX: np.zeros((40, 2), np.float32), "w" + V_SUFFIX: np.zeros((3, 30), np.float32)},
     "do not multiply to its shape"),
    ({"x" + U_SUFFIX: np.zeros((40, 2), np.float32), "x" + V_SUFFIX: np.zeros((2, 30), np.float32)},
     "not a tensor of the global state"),
])
def test_a_broken_factor_pair_is_a_payload_error(wire, fragment):
    with pytest.raises(PayloadError, match=fragment):
        decode(wire, {"w": np.zeros((40, 30), np.float32)})


def test_the_upload_rank_counts_the_projectors_of_a_round():
    assert upload_rank(RunConfig(adapter="full", strategy="fedavg_lora", update_rule="galore", galore_rank=4,
                                 galore_period=10, local_steps=10)) == 4
    assert upload_rank(RunConfig(adapter="full", strategy="fedavg_lora", update_rule="galore", galore_rank=4,
                                 galore_period=4, local_steps=10)) == 12  # projectors at steps 0, 4 and 8
    assert upload_rank(RunConfig(adapter="full", strategy="fedavg_lora")) == 0  # Adam: full-rank changes
    assert upload_rank(RunConfig(update_rule="galore")) == 0  # LoRA factors are already small


def test_the_client_sends_each_galore_trained_delta_as_factors_whose_product_is_its_change(tmp_path):
    from client.train_round import ClientIdentity, train_round
    from common.model import build_model
    from common.payload import trainable_state
    from tests.conftest import write_toy_csv

    config = RunConfig(dataset=str(write_toy_csv(tmp_path, per_class=12)), examples_per_class=0, adapter="full",
                       strategy="fedavg_lora", update_rule="galore", galore_rank=3, local_steps=2, batch_size=8,
                       max_seq_len=12, target_modules="query", target_epsilon=8.0, delta=1e-3, lr=1e-3)
    start = trainable_state(build_model(config, num_labels=3).model)
    outcome = train_round(config, ClientIdentity("0", 0, 1, tmp_path / "ledgers"), start, (), 1)
    deltas = sorted(k for k in start if k.endswith("full_delta.weight"))
    assert logical_keys(outcome.arrays) == set(start)
    assert {k for k in outcome.arrays if k.endswith(U_SUFFIX)} == {k + U_SUFFIX for k in deltas}
    sent = sum(v.nbytes for v in outcome.arrays.values())
    dense = sum(v.nbytes for v in start.values())
    head = sum(v.nbytes for k, v in start.items() if k.startswith("classifier"))
    assert sent == head + len(deltas) * 3 * (384 + 384) * 4 and sent < dense / 30
    rebuilt = decode(outcome.arrays, start)
    for key in deltas:
        change = rebuilt[key] - start[key]
        assert np.abs(change).max() > 0 and np.linalg.matrix_rank(change, tol=1e-6 * np.abs(change).max()) <= 3
