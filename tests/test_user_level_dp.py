"""User-level DP at the server: the noisy clipped mean equals its closed form, the accountant's epsilon is
Opacus' for (σ_u, q, rounds), non-linear strategies refuse the wrapper, and bad settings fail before training."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord
from opacus.accountants import RDPAccountant

from common.config import RunConfig
from common.errors import ConfigError
from common.payload import from_record, to_record
from common.privacy.user_level import (UserLevelAccount, clip_delta, noisy_mean_update, plan_user_account,
                                       poisson_sample)
from server.aggregation import fedsvd_reorthogonalize
from server.report import build_report, recompute, render_markdown
from server.report_html import render_html
from server.report import client_summaries
from server.strategies import STRATEGIES
from server.strategies.user_dp import is_linear, with_user_level_dp
from tests.test_strategies import A, B, HEAD, client_update, global_state, grid, reply, task_identity  # noqa: F401

CLIP = 0.5


def user_strategy(name: str, tmp_path, clients_per_round=2, population=4, noise=1.3, seed=5):
    config = RunConfig(strategy=name, clients_per_round=clients_per_round, user_clip_norm=CLIP,
                       user_noise_multiplier=noise, user_population=population, user_delta=1e-3, num_rounds=3,
                       run_dir=str(tmp_path))
    strategy = with_user_level_dp(STRATEGIES[name]).from_config(config, str(tmp_path))
    strategy.global_arrays = global_state()
    strategy.last_bytes_down = 0
    strategy.account = plan_user_account(config, population)
    strategy.rng = np.random.default_rng(seed)
    return strategy


def expected_release(strategy, payloads, seed=5):
    """global + (Σ clip(payload - global, C) + N(0, σ² C²)) / m, noise drawn key by key in sorted order."""
    keys = sorted(strategy.uplink_keys())
    g = strategy.global_arrays
    total = {k: np.zeros(g[k].shape) for k in keys}
    for p in payloads:
        delta = {k: p[k].astype(np.float64) - g[k] for k in keys}
        norm = math.sqrt(sum(float(np.sum(d ** 2)) for d in delta.values()))
        for k in keys:
            total[k] += delta[k] * min(1.0, CLIP / norm)
    rng = np.random.default_rng(seed)
    sigma = strategy.account.noise_multiplier
    return {k: g[k] + (total[k] + rng.normal(0.0, sigma * CLIP, size=g[k].shape)) / strategy.clients_per_round
            for k in keys}


def test_clip_delta_scales_the_whole_update_as_one_vector():
    delta = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0], [4.0]])}  # norm 5
    clipped, norm = clip_delta(delta, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["b"], [[0.0], [0.8]])
    small, _ = clip_delta(delta, 10.0)
    np.testing.assert_allclose(small["a"], delta["a"])


def test_noisy_mean_with_zero_noise_is_the_uniform_mean_of_clipped_updates():
    deltas = [{"w": np.array([2.0, 0.0])}, {"w": np.array([0.0, 0.5])}]
    mean, norms = noisy_mean_update(deltas, {"w": (2,)}, clip_norm=1.0, noise_multiplier=0.0, denominator=4,
                                    rng=np.random.default_rng(0))
    assert norms == pytest.approx([2.0, 0.5])
    np.testing.assert_allclose(mean["w"], [(1.0 + 0.0) / 4, (0.0 + 0.5) / 4])


def test_fedavg_release_equals_the_closed_form_with_uniform_weights(tmp_path):
    strategy = user_strategy("fedavg_lora", tmp_path)
    updates = [client_update(strategy, k) for k in range(2)]
    expected = expected_release(strategy, updates)
    # very different example counts: under user-level DP they must not change the weights
    arrays, metrics = strategy.aggregate_train(1, [reply(1, updates[0], 10), reply(2, updates[1], 990)])
    out = from_record(arrays)
    for key in (A, B, HEAD):
        np.testing.assert_allclose(out[key], expected[key], rtol=1e-5, atol=1e-6)
    assert [row.round for row in strategy.account.history] == [1]
    assert metrics["user-epsilon"] == pytest.approx(strategy.account.epsilon())
    assert strategy.client_adapters == {}  # no per-client adapter is kept outside the guarantee


def test_fedsvd_reorthogonalizes_the_noisy_average(tmp_path):
    strategy = user_strategy("fedsvd", tmp_path)
    updates = [client_update(strategy, k) for k in range(2)]
    expected = expected_release(strategy, updates)
    arrays, _ = strategy.aggregate_train(2, [reply(1, updates[0], 20), reply(2, updates[1], 60)])
    out = from_record(arrays)
    b, a = fedsvd_reorthogonalize(expected[B].astype(np.float32), strategy.global_arrays[A])
    np.testing.assert_allclose(out[B], b, atol=1e-5)
    np.testing.assert_allclose(out[A], a, atol=1e-5)
    np.testing.assert_allclose(out[HEAD], expected[HEAD], atol=1e-6)


def test_a_round_without_valid_replies_still_releases_noise_and_is_counted(tmp_path):
    strategy = user_strategy("ffa_lora", tmp_path)
    arrays, metrics = strategy.aggregate_train(1, [])
    out = from_record(arrays)
    expected = expected_release(strategy, [])
    np.testing.assert_allclose(out[B], expected[B], atol=1e-6)
    assert not np.allclose(out[B], strategy.global_arrays[B])
    assert metrics["clients-trained"] == 0 and len(strategy.account.history) == 1


def test_user_epsilon_is_opacus_rdp_of_sigma_q_and_released_rounds():
    account = UserLevelAccount(clip_norm=1.0, noise_multiplier=1.1, sample_rate=0.25, population=8, denominator=2,
                               delta=1e-3, target_epsilon=math.inf, accountant="rdp")
    for r in (1, 2, 3):
        account.record(r)
    reference = RDPAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=1.1, sample_rate=0.25)
    assert account.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-9)
    assert UserLevelAccount.from_dict(account.to_dict()) == account


def test_calibrated_user_noise_meets_the_target_and_two_percent_less_would_not():
    config = RunConfig(strategy="fedavg_lora", clients_per_round=2, num_rounds=5, user_clip_norm=1.0,
                       user_target_epsilon=3.0, user_delta=1e-3)
    account = plan_user_account(config, population=10)
    assert account.sample_rate == pytest.approx(0.2) and account.population == 10
    assert account.epsilon(extra=5) <= 3.0
    smaller = UserLevelAccount(**{**account.__dict__, "noise_multiplier": 0.98 * account.noise_multiplier,
                                  "history": []})
    assert smaller.epsilon(extra=5) > 3.0


def test_poisson_sampling_includes_each_node_at_rate_q():
    rng = np.random.default_rng(3)
    nodes = list(range(10))
    counts = np.zeros(10)
    trials = 4000
    for _ in range(trials):
        for node in poisson_sample(nodes, 0.3, rng):
            counts[node] += 1
    se = math.sqrt(0.3 * 0.7 / trials)
    assert np.all(np.abs(counts / trials - 0.3) < 4 * se)


def test_configure_train_samples_by_poisson_from_the_connected_nodes(tmp_path, grid):
    config = RunConfig(strategy="fedavg_lora", clients_per_round=2, user_clip_norm=1.0, user_noise_multiplier=1.0,
                       user_delta=1e-3, run_dir=str(tmp_path))
    strategy = with_user_level_dp(STRATEGIES["fedavg_lora"]).from_config(config, str(tmp_path))
    sizes = [len(list(strategy.configure_train(r, to_record(global_state()), ConfigRecord({}), grid)))
             for r in range(1, 41)]
    assert strategy.account.population == 5 and strategy.account.sample_rate == pytest.approx(0.4)
    assert len(set(sizes)) > 1, "Poisson sampling: the number of clients per round varies"
    assert 0.25 < np.mean(sizes) / 5 < 0.55


def test_state_dict_keeps_the_user_level_account(tmp_path):
    strategy = user_strategy("fedavg_lora", tmp_path)
    strategy.aggregate_train(1, [reply(1, client_update(strategy, 0))])
    state, arrays = strategy.state_dict()
    other = user_strategy("fedavg_lora", tmp_path)
    other.account = None
    other.load_state_dict(state, arrays)
    assert other.account == strategy.account


@pytest.mark.parametrize("name", sorted(n for n, c in STRATEGIES.items() if not is_linear(c)))
def test_strategies_that_are_not_linear_refuse_the_wrapper(name):
    assert name in {"hetlora", "flexlora", "flora", "lora_lego", "fedsvd_het"}
    with pytest.raises(ConfigError,
                       match=f"user-level DP .* {name!r} is not .* use fedavg_lora, fedsa_lora, fedsvd, ffa_lora"):
        with_user_level_dp(STRATEGIES[name])


@pytest.mark.parametrize("settings,message", [
    ({"user_clip_norm": 1.0}, "gives no noise"),
    ({"user_noise_multiplier": 1.0}, "user-clip-norm = 0"),
    ({"user_clip_norm": 1.0, "user_noise_multiplier": 1.0, "min_train_clients": 2}, "min-train-clients = 2"),
    ({"user_clip_norm": 1.0, "user_noise_multiplier": 1.0, "user_population": 1}, "user-population = 1"),
    ({"user_clip_norm": -1.0}, "user-clip-norm = -1.0 is invalid"),
])
def test_bad_user_level_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(clients_per_round=2, **settings).validate()


def test_unreachable_user_target_and_large_delta_fail_before_training():
    base = dict(strategy="fedavg_lora", clients_per_round=4, num_rounds=50, user_clip_norm=1.0)
    with pytest.raises(ConfigError, match="user-target-epsilon = 0.01 cannot be met sensibly: 50 rounds at client "
                                          "sampling rate q = 1"):
        plan_user_account(RunConfig(**base, user_target_epsilon=0.01, user_delta=1e-3), population=4)
    with pytest.raises(ConfigError, match=r"user-delta = 0.3 is not below 1/population = 0.25 for 4 clients"):
        plan_user_account(RunConfig(**base, user_target_epsilon=3.0, user_delta=0.3), population=4)
    with pytest.raises(ConfigError, match="spends user-level epsilon .* above user-target-epsilon = 1"):
        plan_user_account(RunConfig(**base, user_noise_multiplier=0.5, user_target_epsilon=1.0, user_delta=1e-3),
                          population=4)


def test_report_states_both_guarantees_and_recomputes_the_user_epsilon():
    account = UserLevelAccount(clip_norm=0.5, noise_multiplier=1.2, sample_rate=0.5, population=4, denominator=2,
                               delta=1e-3, target_epsilon=5.0, accountant="rdp")
    account.record(1), account.record(2)
    ledgers = {"0": {"history": [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}]}}
    report = build_report(ledgers, delta=1e-5, accountant="rdp", target_epsilon=8.0, run={"strategy": "fedsvd"},
                          user_level=account.to_dict())
    user = report["user_level"]
    assert user["epsilon"] == pytest.approx(account.epsilon()) and user["rounds_released"] == 2
    tampered = {**report, "user_level": {**user, "epsilon": 0.001}}
    assert recompute(tampered)["user_level"]["epsilon"] == pytest.approx(account.epsilon())
    markdown = render_markdown(report)
    assert f"User-level epsilon {account.epsilon():.3f}" in markdown and "Sample-level guarantee" in markdown
    html = render_html(report, client_summaries(report), [])
    assert f'id="user-epsilon">{account.epsilon():.3f}<' in html and "Two guarantees" in html


def test_the_plan_uses_the_connected_nodes_without_a_population():
    config = SimpleNamespace(user_population=0, clients_per_round=2, user_delta=1e-3, user_noise_multiplier=1.0,
                             user_target_epsilon=math.inf, user_clip_norm=1.0, accountant="rdp", num_rounds=2)
    assert plan_user_account(config, population=8).sample_rate == pytest.approx(0.25)


@pytest.mark.slow
def test_a_simulation_with_both_levels_reports_both(tmp_path):
    """A real `flwr run`: clients run DP-SGD (sample level) while the server adds user-level noise."""
    import json

    from tests.conftest import run_demo_ok

    run_dir = tmp_path / "both"
    run_demo_ok(4, f'run-dir="{run_dir}" num-rounds=2 clients-per-round=2 local-steps=3 target-epsilon=8.0 '
                   "user-clip-norm=0.5 user-target-epsilon=5.0 user-delta=0.01")
    report = json.loads((run_dir / "privacy.json").read_text())
    user = report["user_level"]
    assert user["rounds_released"] == 2 and user["population"] == 4 and user["sample_rate"] == 0.5
    assert 4.9 < user["epsilon"] <= 5.0  # calibrated to the target over exactly the rounds released
    trained = [c for c in report["clients"] if c["history"]]
    assert trained and all(c["epsilon"] <= 8.0 for c in trained)
    markdown = (run_dir / "privacy.md").read_text()
    assert f"User-level epsilon {user['epsilon']:.3f}" in markdown and "Sample-level guarantee" in markdown
    assert not (run_dir / "clients").exists()  # no per-client adapter outside the user-level guarantee
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["user-epsilon"] for r in rounds[1:]] == pytest.approx([UserLevelAccount(
        **{k: user[k] for k in ("clip_norm", "noise_multiplier", "sample_rate", "population", "denominator",
                                "delta", "target_epsilon", "accountant")}).epsilon(extra=n) for n in (1, 2)])


def test_a_user_level_only_report_says_the_clients_had_no_dp_sgd():
    account = UserLevelAccount(clip_norm=0.5, noise_multiplier=1.2, sample_rate=0.5, population=4, denominator=2,
                               delta=1e-3, target_epsilon=math.inf, accountant="rdp")
    account.record(1)
    report = build_report({"0": {"history": []}}, delta=1e-5, accountant="rdp", target_epsilon=math.inf, run={},
                          user_level=account.to_dict())
    html = render_html(report, client_summaries(report), [])
    assert "at the server only" in html and "no sample-level guarantee" in html and "Two guarantees" not in html
