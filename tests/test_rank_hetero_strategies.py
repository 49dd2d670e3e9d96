"""The rank-heterogeneous strategies on real Flower messages: per-rank downlinks, closed forms, bad replies."""

from __future__ import annotations

import ast

import numpy as np
import pytest
from flwr.app import ConfigRecord

from common.config import RunConfig
from common.errors import ConfigError
from common.payload import from_record, to_record
from common.ranks import client_rank, config_for_rank
from server.strategies import STRATEGIES, check_compatible
from server.strategies.fedsvd_het import FedSVDHet
from server.strategies.flexlora import FlexLoRA
from server.strategies.flora import FLoRA
from server.strategies.hetlora import HetLoRA
from server.strategies.lora_lego import LoRALEGO
from server.strategies.rank_hetero import RankHeteroStrategy
from tests.conftest import REPO
from tests.test_strategies import grid, reply, task_identity  # noqa: F401  (fixtures)

LAYER = "bert.encoder.layer.0.attention.self.query"
A, B, HEAD = f"{LAYER}.lora_A.weight", f"{LAYER}.lora_B.weight", "classifier.weight"
R_MAX, D_IN, D_OUT = 4, 12, 10
HETERO = {"hetlora": HetLoRA, "flexlora": FlexLoRA, "flora": FLoRA, "lora_lego": LoRALEGO, "fedsvd_het": FedSVDHet}


def global_state(seed: int = 0, zero_b: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = np.zeros((D_OUT, R_MAX)) if zero_b else rng.normal(size=(D_OUT, R_MAX))
    return {A: rng.normal(size=(R_MAX, D_IN)).astype(np.float32), B: b.astype(np.float32),
            HEAD: rng.normal(size=(3, D_IN)).astype(np.float32)}


def strategy_of(cls, tmp_path, ranks: dict[int, int] | None = None, **kwargs) -> RankHeteroStrategy:
    strategy = cls(clients_per_round=2, seed=7, run_dir=str(tmp_path), r_max=R_MAX, **kwargs)
    strategy.global_arrays = global_state()
    strategy.node_ranks = dict(ranks or {})
    return strategy


def update(rank: int, seed: int, with_a: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    out = {B: rng.normal(size=(D_OUT, rank)).astype(np.float32), HEAD: rng.normal(size=(3, D_IN)).astype(np.float32)}
    if with_a:
        out[A] = rng.normal(size=(rank, D_IN)).astype(np.float32)
    return out


def best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]



# ---- registry and configuration ----------------------------------------------------------------------

def test_registry_has_the_five_rank_heterogeneous_strategies():
    assert {n for n, c in STRATEGIES.items() if c.rank_heterogeneous} == set(HETERO)
    for name, cls in HETERO.items():
        assert STRATEGIES[name] is cls and issubclass(cls, RankHeteroStrategy)
    assert {n for n, c in STRATEGIES.items() if c.secure_aggregation} == {"fedavg_lora", "ffa_lora", "fedsvd",
                                                                         "fedsa_lora", "fedsvd_het"}


def test_from_config_carries_r_max_and_the_options(tmp_path):
    config = RunConfig.from_flower({"strategy": "flora", "rank": 16, "client-ranks": "4,8,16",
                                    "global-max-rank": 64, "hetlora-prune": 0.1})
    strategy = STRATEGIES["flora"].from_config(config, str(tmp_path))
    assert (strategy.r_max, strategy.global_max_rank, strategy.prune) == (16, 64, 0.1)
    assert strategy.run_dir == str(tmp_path) and strategy.clients_per_round == config.clients_per_round


def test_bad_rank_settings_are_config_errors():
    with pytest.raises(ConfigError, match="client-ranks = '4,x' is invalid: give comma-separated integers"):
        RunConfig.from_flower({"client-ranks": "4,x"})
    with pytest.raises(ConfigError, match="client-ranks = '4,0' is invalid"):
        RunConfig.from_flower({"client-ranks": "4,0"})
    with pytest.raises(ConfigError, match="client-ranks = '4,32' has a rank above rank = 8"):
        RunConfig.from_flower({"client-ranks": "4,32"})
    with pytest.raises(ConfigError, match="global-max-rank = -1 is invalid"):
        RunConfig.from_flower({"global-max-rank": -1})
    with pytest.raises(ConfigError, match="client-ranks needs a rank-heterogeneous strategy, and 'fedsvd' is not"):
        check_compatible("fedsvd", "lora", (4, 8))
    with pytest.raises(ConfigError, match="strategy 'flexlora' merges adapter\\(s\\) lora only, not 'dora'"):
        check_compatible("flexlora", "dora", (4, 8))
    check_compatible("flexlora", "lora", (4, 8))


def test_a_client_rank_comes_from_node_config_then_client_ranks_then_rank():
    config = RunConfig.from_flower({"rank": 16, "client-ranks": "4,8"})
    assert [client_rank(config, {}, pid) for pid in range(4)] == [4, 8, 4, 8]
    assert client_rank(config, {"rank": 2}, 1) == 2
    assert client_rank(RunConfig.from_flower({"rank": 16}), {}, 3) == 16
    with pytest.raises(ConfigError, match="node-config rank = 'big' is invalid"):
        client_rank(config, {"rank": "big"}, 0)


def test_every_rank_scales_by_alpha_over_r_max():
    """One common scale: a rank-4 adapter zero-padded to 16 is the same ΔW."""
    config = RunConfig.from_flower({"rank": 16, "alpha": 32.0})
    small = config_for_rank(config, 4)
    assert small.rank == 4 and small.alpha / small.rank == pytest.approx(config.alpha / config.rank)
    assert config_for_rank(config, 16) is config


def test_strategies_read_nothing_but_the_replies():
    """Post-processing of DP outputs only: no strategy or merge module imports data, model or client code."""
    files = [REPO / "server/strategies" / f"{name}.py" for name in (*HETERO, "rank_hetero", "base")]
    files += [REPO / "server/rank_merging.py", REPO / "server/lego.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert not name.startswith(("common.data", "common.model", "client", "torch", "datasets")), \
                        f"{path.name} imports {name}"


# ---- what travels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HETERO))
def test_each_node_gets_the_global_truncated_to_its_rank(name, tmp_path, grid):  # noqa: F811
    cls = HETERO[name]
    strategy = cls(clients_per_round=5, seed=3, run_dir=str(tmp_path), r_max=R_MAX)
    ranks = dict(zip(sorted(grid.get_node_ids()), (1, 2, 3, 4, 2)))
    strategy.node_ranks = dict(ranks)
    start = global_state(1)
    messages = list(strategy.configure_train(1, to_record(start), ConfigRecord({}), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(ranks)
    sent_bytes = 0
    for message in messages:
        rank = ranks[message.metadata.dst_node_id]
        sent = from_record(message.content["arrays"])
        config = message.content["config"]
        assert config["rank"] == rank and config["fold"] == int(name == "flora")
        keep = R_MAX if name == "flora" else rank  # FLoRA's clients add the whole global to their base
        np.testing.assert_array_equal(sent[A], start[A][:keep])
        np.testing.assert_array_equal(sent[B], start[B][:, :keep])
        np.testing.assert_array_equal(sent[HEAD], start[HEAD])
        sent_bytes += sum(v.nbytes for v in sent.values())
    assert strategy.last_bytes_down == sent_bytes
    expected_up = {B, HEAD} if name == "fedsvd_het" else {A, B, HEAD}
    assert strategy.uplink_keys() == expected_up


# ---- closed forms -----------------------------------------------------------------------------------------

def test_flexlora_gives_the_best_rank_r_max_approximation_of_the_mean_product(tmp_path):
    strategy = strategy_of(FlexLoRA, tmp_path, {1: 3, 2: 4})
    u1, u2 = update(3, 1), update(4, 2)
    arrays, metrics = strategy.aggregate_train(1, [reply(1, u1, 10), reply(2, u2, 30)])
    out = from_record(arrays)
    mean = 0.25 * u1[B].astype(np.float64) @ u1[A] + 0.75 * u2[B].astype(np.float64) @ u2[A]
    np.testing.assert_allclose(out[B] @ out[A], best_rank(mean, R_MAX), atol=1e-4)
    np.testing.assert_allclose(out[A] @ out[A].T, np.eye(R_MAX), atol=1e-5)
    for k in (1, 2, 3):  # each prefix is the best rank-k approximation: what a rank-k client receives
        np.testing.assert_allclose(out[B][:, :k] @ out[A][:k], best_rank(mean, k), atol=1e-4)
    np.testing.assert_allclose(out[HEAD], 0.25 * u1[HEAD] + 0.75 * u2[HEAD], atol=1e-6)
    assert metrics["clients-trained"] == 2 and out[A].dtype == np.float32


def test_hetlora_pads_and_weights_by_update_norm(tmp_path):
    strategy = strategy_of(HetLoRA, tmp_path, {1: 2, 2: 4})
    u1, u2 = update(2, 1), update(4, 2)
    arrays, _ = strategy.aggregate_train(1, [reply(1, u1, 10), reply(2, u2, 30)])
    out = from_record(arrays)
    q = np.array([10 * np.linalg.norm(u1[B].astype(np.float64) @ u1[A]),
                  30 * np.linalg.norm(u2[B].astype(np.float64) @ u2[A])])
    q /= q.sum()
    padded_b1 = np.hstack([u1[B], np.zeros((D_OUT, 2))])
    padded_a1 = np.vstack([u1[A], np.zeros((2, D_IN))])
    np.testing.assert_allclose(out[B], q[0] * padded_b1 + q[1] * u2[B], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[A], q[0] * padded_a1 + q[1] * u2[A], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[HEAD], 0.25 * u1[HEAD] + 0.75 * u2[HEAD], atol=1e-6)


def test_hetlora_prunes_the_rank_of_a_client_whose_last_component_is_negligible(tmp_path, server_log):
    strategy = strategy_of(HetLoRA, tmp_path, {1: 3, 2: 3}, prune=0.05)
    small_tail, full = update(3, 1), update(3, 2)
    small_tail[B][:, -1] *= 1e-4
    strategy.aggregate_train(1, [reply(1, small_tail, 10), reply(2, full, 10)])
    assert strategy.node_ranks == {1: 2, 2: 3}
    assert "node 1 prunes its rank 3 -> 2" in server_log.text


def test_flora_stacks_exactly_and_the_global_rank_grows(tmp_path):
    strategy = strategy_of(FLoRA, tmp_path, {1: 2, 2: 3})
    start = dict(strategy.global_arrays)
    u1, u2 = update(2, 1), update(3, 2)
    arrays, _ = strategy.aggregate_train(1, [reply(1, u1, 10), reply(2, u2, 30)])
    out = from_record(arrays)
    expected = start[B].astype(np.float64) @ start[A] + 0.25 * u1[B] @ u1[A] + 0.75 * u2[B] @ u2[A]
    assert out[A].shape == (R_MAX + 5, D_IN) and out[B].shape == (D_OUT, R_MAX + 5)
    np.testing.assert_allclose(out[B] @ out[A], expected, atol=1e-4)


def test_flora_starts_from_an_empty_stack_and_truncates_to_global_max_rank(tmp_path):
    strategy = strategy_of(FLoRA, tmp_path, {1: 2, 2: 3}, global_max_rank=3)
    strategy.global_arrays = global_state(zero_b=True)  # the initial LoRA: B = 0
    u1, u2 = update(2, 1), update(3, 2)
    exact = 0.5 * u1[B].astype(np.float64) @ u1[A] + 0.5 * u2[B] @ u2[A]
    out = from_record(strategy.aggregate_train(1, [reply(1, u1, 10), reply(2, u2, 10)])[0])
    assert out[A].shape == (3, D_IN)  # 5 stacked components, truncated to 3
    np.testing.assert_allclose(out[B] @ out[A], best_rank(exact, 3), atol=1e-4)
    strategy.global_max_rank = 0
    out = from_record(strategy.aggregate_train(1, [reply(1, u1, 10), reply(2, u2, 10)])[0])
    assert out[A].shape == (5, D_IN)  # the zero initial B added nothing to the stack
    np.testing.assert_allclose(out[B] @ out[A], exact, atol=1e-4)


def test_fedsvd_het_averages_b_against_the_sent_prefixes_and_reorthogonalizes(tmp_path):
    strategy = strategy_of(FedSVDHet, tmp_path, {1: 2, 2: 4})
    g = strategy.global_arrays
    u1, u2 = update(2, 1, with_a=False), update(4, 2, with_a=False)
    out = from_record(strategy.aggregate_train(1, [reply(1, u1, 10), reply(2, u2, 30)])[0])
    a, b = g[A].astype(np.float64), g[B].astype(np.float64)
    expected = 0.25 * (u1[B] @ a[:2] + b[:, 2:] @ a[2:]) + 0.75 * u2[B] @ a
    np.testing.assert_allclose(out[B] @ out[A], expected, atol=1e-4)
    np.testing.assert_allclose(out[A] @ out[A].T, np.eye(R_MAX), atol=1e-5)
    norms = np.linalg.norm(out[B], axis=0)
    assert np.all(np.diff(norms) <= 1e-5), "components are ordered by singular value, so prefixes are the best"


def test_lora_lego_is_exact_when_the_units_fit_in_r_max(tmp_path):
    strategy = strategy_of(LoRALEGO, tmp_path, {1: 1, 2: 3})
    u1, u2 = update(1, 1), update(3, 2)
    out = from_record(strategy.aggregate_train(1, [reply(1, u1, 10), reply(2, u2, 30)])[0])
    expected = 0.25 * u1[B].astype(np.float64) @ u1[A] + 0.75 * u2[B] @ u2[A]
    np.testing.assert_allclose(out[B] @ out[A], expected, atol=1e-4)


# ---- bad replies ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HETERO))
def test_bad_replies_are_rejected_with_the_client_and_reason_and_the_rest_aggregates(name, tmp_path, server_log):
    cls = HETERO[name]
    with_a = name != "fedsvd_het"
    strategy = strategy_of(cls, tmp_path, {1: 2, 2: 8, 3: 2, 4: 2, 5: 3, 6: 2})
    good = update(2, 1, with_a)
    too_big = update(8, 2, with_a)
    wrong_d = {**update(2, 3, with_a), B: np.ones((D_OUT + 1, 2), np.float32)}
    nan = {**update(2, 4, with_a), B: np.full((D_OUT, 2), np.nan, np.float32)}
    undeclared = update(2, 5, with_a)  # node 5 declared rank 3
    mixed = {**update(2, 6, with_a), B: np.ones((D_OUT, 3), np.float32)} if with_a else None
    replies = [reply(1, good, 10), reply(2, too_big), reply(3, wrong_d), reply(4, nan), reply(5, undeclared)]
    if mixed is not None:
        replies.append(reply(6, mixed))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-trained"] == 1
    text = server_log.text
    assert "rejected reply of client 2: its rank 8 exceeds r_max = 4" in text
    assert f"rejected reply of client 3: {B} has shape [11, 2], which does not fit the layer" in text
    assert f"rejected reply of client 4: {B} contains NaN or Inf" in text
    assert "rejected reply of client 5: its rank is 2 but it declared 3" in text
    if mixed is not None:
        assert "rejected reply of client 6: its factors have different ranks [2, 3]" in text
    np.testing.assert_allclose(from_record(arrays)[HEAD], good[HEAD])
