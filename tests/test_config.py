"""The run config: pyproject defaults parse, bad values are one clear ConfigError."""

from __future__ import annotations

import math
import tomllib

import pytest

from common.config import RunConfig
from common.errors import ConfigError
from tests.conftest import REPO


def pyproject_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_setting_and_parses():
    raw = pyproject_config()
    config = RunConfig.from_flower(raw)
    assert set(raw) == set(config.to_flower())
    assert RunConfig.from_flower(config.to_flower()) == config


@pytest.mark.parametrize("key,value,fragment", [
    ("rank", 0, "rank = 0 is invalid"),
    ("rank", -3, "rank"),
    ("target-epsilon", -1.0, "target-epsilon = -1.0 is invalid"),
    ("delta", 1.5, "delta"),
    ("max-grad-norm", 0.0, "max-grad-norm"),
    ("accountant", "gdp", "choose one of rdp, prv"),
    ("partitioner", "shards", "choose one of iid, dirichlet"),
    ("num-rounds", 2.5, "expected a value of type int"),
    ("lr", "fast", "expected a value of type float"),
    ("target-modules", " , ", "target-modules is empty"),
])
def test_bad_values_are_rejected_with_the_key_named(key, value, fragment):
    raw = {**pyproject_config(), key: value}
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flower(raw)


def test_unknown_key_is_rejected_and_known_keys_listed():
    with pytest.raises(ConfigError, match="unknown run-config key.*num-round.*known keys"):
        RunConfig.from_flower({"num-round": 3})


def test_infinite_epsilon_means_non_private_unless_noise_is_given():
    assert not RunConfig(target_epsilon=math.inf).private
    assert RunConfig(target_epsilon=math.inf, noise_multiplier=1.0).private
    assert RunConfig(target_epsilon=3.0).private


def test_planned_rounds_follow_participation():
    assert RunConfig(num_rounds=10).planned_rounds == 10
    assert RunConfig(num_rounds=10, planned_participation=0.25).planned_rounds == 3
