"""The simulation's resource request, parsed by Flower's own `--federation-config` parser."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json

from simulations.flower_sim import federation_config


def parsed(text: str):
    values = parse_config_args([text])
    return simulation_config_from_json({k.replace("-", "_"): v for k, v in values.items()})


def test_cpu_only_request_asks_for_no_gpu():
    config = parsed(federation_config(4, 1, 0.0))
    assert config.num_supernodes == 4 and config.client_resources_num_cpus == 1
    assert not config.HasField("client_resources_num_gpus")


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_gpu_share_reaches_flower(share):
    """Ray hides the GPU from ClientApps that request none: the share must arrive as a float field."""
    config = parsed(federation_config(4, 1, share))
    assert config.client_resources_num_gpus == pytest.approx(share)
