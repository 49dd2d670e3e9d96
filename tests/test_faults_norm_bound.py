"""The server-side norm bound (`max-update-norm`): a poisoned but well-formed update moves the global model
by at most its weight share times the bound."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
from common.errors import ConfigError
from common.payload import from_record
from server.aggregation import clip_update, fedsvd_reorthogonalize, update_norm
from server.strategies import STRATEGIES
from server.strategies.fedavg_lora import FedAvgLoRA
from server.strategies.fedsvd import FedSVD
from server.strategies.ffa_lora import FFALoRA
from tests.test_strategies import A, B, HEAD, global_state, reply, task_identity  # noqa: F401

pytestmark = pytest.mark.faults
BOUND = 0.5


def test_clip_update_closed_form():
    reference = {"x": np.array([1.0, 1.0], np.float32), "y": np.array([[2.0]], np.float32)}
    payload = {"x": np.array([4.0, 1.0], np.float32), "y": np.array([[6.0]], np.float32)}  # update (3, 0 | 4)
    assert update_norm(payload, reference) == 5.0  # one vector over every key, not a norm per tensor
    clipped, norm = clip_update(payload, reference, 2.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["x"], [1.0 + 3 * 0.4, 1.0])
    np.testing.assert_allclose(clipped["y"], [[2.0 + 4 * 0.4]])
    assert clipped["x"].dtype == np.float32 and update_norm(clipped, reference) == pytest.approx(2.0)
    same, norm = clip_update(payload, reference, 5.0)  # on the bound: left alone
    assert same is payload and norm == 5.0


def strategy_with_bound(cls, tmp_path, state):
    strategy = cls(clients_per_round=3, seed=7, run_dir=str(tmp_path), max_update_norm=BOUND)
    strategy.global_arrays, strategy.last_bytes_down = state, 0
    return strategy


def updates(strategy, attack: float):
    """Two honest clients (update norm 0.1 and 0.3, under the bound) and one sending `attack` x a unit update."""
    rng = np.random.default_rng(3)
    out = []
    for scale in (0.1, 0.3, attack):
        direction = {k: rng.normal(size=v.shape) for k, v in strategy.global_arrays.items() if k in strategy.uplink_keys()}
        norm = np.sqrt(sum(np.sum(d ** 2) for d in direction.values()))
        out.append({k: (strategy.global_arrays[k] + scale * d / norm).astype(np.float32) for k, d in direction.items()})
    return out


@pytest.mark.parametrize("cls", [FedAvgLoRA, FFALoRA])
def test_a_1e6_update_moves_the_mean_by_at_most_its_share_of_the_bound(tmp_path, cls):
    state = global_state()
    strategy = strategy_with_bound(cls, tmp_path, state)
    honest_1, honest_2, attack = updates(strategy, 1e6)
    weights = (10, 30, 60)  # the attacker also claims the largest share: 0.6
    out = from_record(strategy.aggregate_train(1, [reply(1, honest_1, 10), reply(2, honest_2, 30),
                                                   reply(3, attack, 60)])[0])
    # Closed form: honest updates unchanged, the attacker's scaled to norm BOUND, then the weighted mean.
    clipped_attack = {k: state[k] + (attack[k] - state[k]) * BOUND / 1e6 for k in attack}
    for key in attack:
        expected = sum(w * p[key] for w, p in zip(weights, (honest_1, honest_2, clipped_attack))) / 100
        np.testing.assert_allclose(out[key], expected, atol=1e-5)
    # What the attacker moved: the global with its reply minus the global had it sent no update at all.
    without = from_record(strategy_with_bound(cls, tmp_path, state).aggregate_train(
        1, [reply(1, honest_1, 10), reply(2, honest_2, 30), reply(3, {k: state[k] for k in attack}, 60)])[0])
    assert update_norm(out, without) <= 0.6 * BOUND * (1 + 1e-4)
    assert update_norm(out, without) == pytest.approx(0.6 * BOUND, rel=1e-3)  # the bound is reached, not undershot
    [fault] = strategy.faults
    assert fault == {"round": 1, "node": 3, "client": "3", "kind": "update-clipped",
                     "reason": "update norm 1e+06 > max-update-norm = 0.5", "action": "update scaled to norm 0.5"}


def test_without_the_bound_the_same_attack_takes_over(tmp_path):
    """The test above can fail: with max-update-norm = 0 the attacker moves the global by 0.6 x 1e6."""
    state = global_state()
    strategy = FedAvgLoRA(clients_per_round=3, seed=7, run_dir=str(tmp_path))
    strategy.global_arrays, strategy.last_bytes_down = state, 0
    honest_1, honest_2, attack = updates(strategy, 1e6)
    out = from_record(strategy.aggregate_train(1, [reply(1, honest_1, 10), reply(2, honest_2, 30),
                                                   reply(3, attack, 60)])[0])
    assert update_norm(out, state) > 0.5e6 and strategy.faults == []


def test_fedsvd_bounds_the_product_too(tmp_path):
    """FedSVD sends B; with A's rows orthonormal (as FedSVD keeps them), ||ΔB A|| = ||ΔB||, and the
    re-orthogonalization keeps the product: the product and head move by exactly share x BOUND."""
    state = global_state()
    state[B], state[A] = fedsvd_reorthogonalize(state[B], state[A])
    strategy = strategy_with_bound(FedSVD, tmp_path, state)
    attack = updates(strategy, 1e6)[2]
    unchanged = {k: state[k] for k in attack}
    out = from_record(strategy.aggregate_train(1, [reply(1, unchanged, 10), reply(2, unchanged, 30),
                                                   reply(3, attack, 60)])[0])
    moved = np.sqrt(np.sum((out[B] @ out[A] - state[B] @ state[A]) ** 2) + np.sum((out[HEAD] - state[HEAD]) ** 2))
    assert moved == pytest.approx(0.6 * BOUND, rel=1e-3)


@pytest.mark.parametrize("name", sorted(n for n, c in STRATEGIES.items() if c.rank_heterogeneous))
def test_rank_heterogeneous_strategies_refuse_the_bound(tmp_path, name):
    config = RunConfig(strategy=name, max_update_norm=1.0)
    with pytest.raises(ConfigError, match=f"max-update-norm = 1 is not supported by the rank-heterogeneous strategy "
                                          f"{STRATEGIES[name].__name__}: .* set max-update-norm = 0"):
        STRATEGIES[name].from_config(config, str(tmp_path))
    assert STRATEGIES[name].from_config(RunConfig(strategy=name), str(tmp_path)).max_update_norm == 0.0


def test_the_bound_is_a_validated_run_config_key():
    assert RunConfig.from_flower({"max-update-norm": 2.5}).max_update_norm == 2.5
    with pytest.raises(ConfigError, match="max-update-norm = -1.0 is invalid: must be >= 0"):
        RunConfig.from_flower({"max-update-norm": -1.0})
