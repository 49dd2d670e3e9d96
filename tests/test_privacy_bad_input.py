"""Privacy settings that cannot work stop before training, with an error that names the numbers."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from client.adapter_init import init_round
from client.train_round import ClientIdentity, train_round
from common.config import RunConfig
from common.data.partition import client_data
from common.errors import ConfigError
from common.privacy import PrivacyStep, epsilon_of, poisson_sample_rate
from common.privacy.accounting import check_history_covers
from common.privacy.plan import MAX_NOISE_MULTIPLIER, check_delta, check_privacy_plan, planned_dp_steps
from simulations.demo import validate
from tests.conftest import write_toy_csv


def test_delta_of_one_over_n_or_more_names_delta_n_and_a_fix():
    with pytest.raises(ConfigError, match=r"delta = 0\.01 is not below 1/n = 0\.00333 .* n = 300 .* delta = 0\.0001"):
        check_delta(0.01, 300)
    with pytest.raises(ConfigError, match="n = 100"):
        check_delta(0.01, 100)  # exactly 1/n is already too large
    check_delta(0.01, 99)
    check_delta(1e-5, 300)


def test_a_target_needing_more_than_the_sane_noise_names_target_steps_and_noise():
    config = RunConfig(target_epsilon=0.11, num_rounds=3, local_steps=10)
    with pytest.raises(ConfigError) as err:
        check_privacy_plan(config, 300)
    message = str(err.value)
    assert "target-epsilon = 0.11" in message and "30 planned DP steps" in message
    needed = float(re.search(r"noise multiplier of ([0-9.e+]+),", message).group(1))
    assert needed > MAX_NOISE_MULTIPLIER
    rate = poisson_sample_rate(300, config.batch_size)
    # the named noise really is what the target needs: it meets it, and the sane bound does not
    assert epsilon_of([PrivacyStep(1, needed * 1.01, rate, 30)], config.delta) <= 0.11
    assert epsilon_of([PrivacyStep(1, MAX_NOISE_MULTIPLIER, rate, 30)], config.delta) > 0.11


def test_a_target_no_noise_can_meet_says_so():
    with pytest.raises(ConfigError, match=r"target-epsilon = 0\.05 .* noise multiplier of more than 1000,"):
        check_privacy_plan(RunConfig(target_epsilon=0.05), 300)


def test_sensible_plans_pass():
    check_privacy_plan(RunConfig(), 300)  # the defaults: target 8 at delta 1e-5, 30 steps at q = 1/5
    check_privacy_plan(RunConfig(noise_multiplier=1.0, target_epsilon=0.05), 300)  # given noise: no calibration
    check_privacy_plan(RunConfig(target_epsilon=math.inf, delta=0.5), 300)  # not private: nothing to check
    with pytest.raises(ConfigError, match="delta"):
        check_privacy_plan(RunConfig(noise_multiplier=1.0, delta=0.01), 300)  # given noise still needs delta < 1/n


def test_planned_steps_count_every_planned_round_and_the_private_init():
    assert planned_dp_steps(RunConfig(num_rounds=4, local_steps=10, planned_participation=0.5)) == 20
    assert planned_dp_steps(RunConfig(adapter="lora_sb", init_data="private", num_rounds=3, local_steps=10)) == 31


def test_a_ledger_missing_a_trained_round_is_named():
    history = [PrivacyStep(1, 1.0, 0.2, 10), PrivacyStep(3, 1.0, 0.2, 10)]
    with pytest.raises(ValueError, match=r"client 7: .* no row for trained round\(s\) 2, 4;"):
        check_history_covers(history, [1, 2, 3, 4], "7")
    check_history_covers(history, [1, 3], "7")  # rounds it was not sampled for are not missing


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
    path = write_toy_csv(tmp_path_factory.mktemp("data"))
    return RunConfig(dataset=str(path), examples_per_class=0, num_rounds=2, local_steps=2, batch_size=8,
                     max_seq_len=16, rank=4, clients_per_round=2)


def test_the_client_refuses_before_its_ledger_is_written(toy_config, tmp_path):
    n = len(client_data(toy_config, 0, 2).train)
    identity = ClientIdentity(client_id="0", partition_id=0, num_partitions=2, ledger_dir=tmp_path)
    bad = dataclasses.replace(toy_config, delta=min(0.5, 2.0 / n))
    with pytest.raises(ConfigError, match=f"n = {n} "):
        train_round(bad, identity, {}, (), server_round=1)
    private_init = dataclasses.replace(bad, adapter="lora_sb", init_data="private")
    with pytest.raises(ConfigError, match=f"n = {n} "):
        init_round(private_init, identity)
    assert not list(tmp_path.iterdir())  # nothing charged, nothing trained


def test_the_demo_checks_every_client_before_starting(toy_config):
    validate(toy_config, 2)
    smallest = min(len(client_data(toy_config, pid, 2).train) for pid in range(2))
    with pytest.raises(ConfigError, match=f"n = {smallest} "):
        validate(dataclasses.replace(toy_config, delta=1.0 / smallest), 2)
