"""Closed forms of the structured adapters (Bone, Bat, Block-LoRA, Hydra, WaRA), beyond the shared table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.adapters import get_adapter
from common.adapters.lora import LoRAConfig, LoRALinear
from common.adapters.wara import haar_analysis, haar_synthesis
from common.config import RunConfig
from common.errors import ConfigError
from server.strategies import check_compatible
from tests.test_adapters import randomize_trainables


def wrapped(name: str, d_in: int, d_out: int, rank: int, **settings):
    kind = get_adapter(name)
    config = kind.make_config(RunConfig(adapter=name, rank=rank, alpha=6.0, **settings))
    torch.manual_seed(0)
    return kind.wrap(nn.Linear(d_in, d_out), config, "encoder.layer.0.query"), config


def tokens(d_in: int) -> torch.Tensor:
    return torch.randn(5, 3, d_in, generator=torch.Generator().manual_seed(1))


def test_bone_update_is_the_shared_block_tiled_across_input_blocks_with_a_partial_last_one():
    layer, _ = wrapped("bone", d_in=10, d_out=6, rank=4)  # blocks of columns 0-3, 4-7 and 8-9
    randomize_trainables(layer, seed=1)
    b = layer.miss_block.weight.detach()  # r x d_out
    delta = layer.delta_weight().detach()
    for start in (0, 4):
        torch.testing.assert_close(delta[:, start : start + 4], b.T, atol=0, rtol=0)
    torch.testing.assert_close(delta[:, 8:], b.T[:, :2], atol=0, rtol=0)
    assert int(torch.linalg.matrix_rank(delta)) <= 4
    x = tokens(10)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + delta, layer.base.bias))


def assert_equals_peft_miss(layer, d_in: int, d_out: int, rank: int, init_weights) -> None:
    """PEFT's MiSS layer on the same base (seed 0) holding our trained block gives our forward, and its
    merge gives our W0 + ΔW."""
    from peft import MissConfig, get_peft_model

    model = nn.Sequential()
    torch.manual_seed(0)
    model.add_module("query", nn.Linear(d_in, d_out))
    peft_model = get_peft_model(model, MissConfig(r=rank, target_modules=["query"], init_weights=init_weights))
    peft_layer = peft_model.base_model.model.query
    with torch.no_grad():
        peft_layer.miss_block["default"].copy_(layer.miss_block.weight)
    x = tokens(d_in)
    torch.testing.assert_close(peft_model(x), layer(x), atol=1e-6, rtol=1e-5)
    peft_layer.merge()
    torch.testing.assert_close(peft_layer.base_layer.weight, layer.base.weight + layer.delta_weight(),
                               atol=1e-6, rtol=1e-5)


def test_bone_equals_peft_miss_on_a_layer_whose_width_the_rank_does_not_divide():
    """PEFT pads x to a multiple of r in the forward and tiles bᵀ when merging; we must agree with both."""
    layer, _ = wrapped("bone", d_in=10, d_out=6, rank=4)
    randomize_trainables(layer, seed=2)
    assert_equals_peft_miss(layer, d_in=10, d_out=6, rank=4, init_weights=True)


def test_bat_blocks_are_the_frozen_blocks_times_their_row_blocks_update_plus_it():
    layer, config = wrapped("bat", d_in=8, d_out=6, rank=2)
    randomize_trainables(layer, seed=8)
    w0, b = layer.base.weight.detach(), layer.miss_block.weight.detach()  # b: 3 x 2 x 2
    delta = layer.delta_weight().detach()
    for i in range(3):
        for j in range(4):
            block = w0[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            torch.testing.assert_close(delta[2 * i : 2 * i + 2, 2 * j : 2 * j + 2], (block + torch.eye(2)) @ b[i])
    assert get_adapter("bat").trainable_count(6, 8, config) == 3 * 2 * 2 == b.numel()


def test_bat_equals_peft_miss_bat():
    layer, _ = wrapped("bat", d_in=8, d_out=6, rank=2)
    randomize_trainables(layer, seed=9)
    assert_equals_peft_miss(layer, d_in=8, d_out=6, rank=2, init_weights="bat")


def test_block_lora_equals_a_lora_whose_down_projection_is_the_shared_block_tiled():
    """d_in = 10 in n = 4 blocks: c = 3, A = [A_0 A_0 A_0 A_0[:, :1]] (the input zero-padded to 12)."""
    layer, config = wrapped("block_lora", d_in=10, d_out=6, rank=2, block_lora_blocks=4)
    assert layer.block_A.weight.shape == (2, 3)
    assert get_adapter("block_lora").trainable_count(6, 10, config) == 2 * 6 + 2 * 3
    randomize_trainables(layer, seed=3)
    a0 = layer.block_A.weight.detach()
    lora = LoRALinear(layer.base, LoRAConfig(rank=2, alpha=6.0), "query")
    with torch.no_grad():
        lora.lora_A.weight.copy_(torch.cat([a0, a0, a0, a0[:, :1]], dim=1))
        lora.lora_B.weight.copy_(layer.block_B.weight)
    x = tokens(10)
    torch.testing.assert_close(layer(x), lora(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), lora.delta_weight(), atol=1e-6, rtol=1e-5)


def test_block_lora_block_count_of_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="block-lora-blocks = 0 is invalid"):
        RunConfig.from_flower({"adapter": "block_lora", "block-lora-blocks": 0})


def test_hydra_merges_both_branches_into_weight_and_bias_and_is_lora_without_its_sequential_branch():
    layer, config = wrapped("hydra", d_in=8, d_out=6, rank=2)
    randomize_trainables(layer, seed=4)
    s, w0, b0 = config.scaling, layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    par = layer.hydra_par_B.weight @ layer.hydra_par_A.weight
    seq = layer.hydra_seq_B.weight @ layer.hydra_seq_A.weight
    x = tokens(8)
    expected = F.linear(x, w0 + s * (par + seq @ w0), b0 + s * seq @ b0)  # seq reads W0 x + b0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.base.bias, b0 + s * seq @ b0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.bias, b0, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.hydra_seq_B.weight.zero_()
    lora = LoRALinear(layer.base, LoRAConfig(rank=2, alpha=6.0), "query")
    with torch.no_grad():
        lora.lora_A.weight.copy_(layer.hydra_par_A.weight)
        lora.lora_B.weight.copy_(layer.hydra_par_B.weight)
    torch.testing.assert_close(layer(x), lora(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["ffa_lora", "fedsvd"])
def test_strategies_built_on_one_lora_pair_refuse_the_structured_adapters(strategy):
    for adapter in ("bone", "bat", "block_lora", "hydra", "wara"):
        with pytest.raises(ConfigError, match=f"strategy '{strategy}' needs an adapter with lora_A and lora_B; "
                                              f"adapter '{adapter}' trains .*: use strategy 'fedavg_lora'"):
            check_compatible(strategy, adapter)
    check_compatible("fedavg_lora", "hydra")


def test_wara_update_is_the_inverse_haar_transform_of_the_sub_band_products():
    """The textbook single-level 2-D Haar synthesis, entry by entry, on a 10 x 12 layer."""
    layer, config = wrapped("wara", d_in=12, d_out=10, rank=2)
    randomize_trainables(layer, seed=5)
    c = {band: (layer.factor(band, "B").weight @ layer.factor(band, "A").weight).detach()
         for band in ("LL", "LH", "HL", "HH")}
    ll, lh, hl, hh = c["LL"], c["LH"], c["HL"], c["HH"]  # (row band, column band), each 5 x 6
    expected = torch.zeros(10, 12)
    expected[0::2, 0::2] = (ll + lh + hl + hh) / 2
    expected[0::2, 1::2] = (ll - lh + hl - hh) / 2
    expected[1::2, 0::2] = (ll + lh - hl - hh) / 2
    expected[1::2, 1::2] = (ll - lh - hl + hh) / 2
    delta = layer.delta_weight().detach()
    torch.testing.assert_close(delta, config.scaling * expected, atol=1e-6, rtol=1e-5)
    coefficients = torch.cat([torch.cat([ll, lh], 1), torch.cat([hl, hh], 1)], 0)
    torch.testing.assert_close(torch.linalg.norm(delta), config.scaling * torch.linalg.norm(coefficients))


def test_wara_rank_exceeds_r_where_one_pair_on_the_packed_coefficients_cannot():
    layer, config = wrapped("wara", d_in=16, d_out=16, rank=2)
    randomize_trainables(layer, seed=6)
    assert int(torch.linalg.matrix_rank(layer.delta_weight().detach())) == 4 * 2
    assert get_adapter("wara").trainable_count(16, 16, config) == 2 * 2 * (16 + 16)


def test_wara_forward_equals_its_update_on_odd_widths_and_the_haar_step_is_orthonormal():
    layer, _ = wrapped("wara", d_in=7, d_out=9, rank=2)
    randomize_trainables(layer, seed=7)
    x = tokens(7)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias),
                               atol=1e-5, rtol=1e-5)
    for n in (6, 7):
        h = torch.cat(haar_analysis(torch.eye(n, dtype=torch.float64)), dim=-1).T  # rows: the Haar basis
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        v = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(haar_synthesis(*haar_analysis(v)), v, atol=1e-12, rtol=0)
    assert math.isclose(float(h[0, 0]), 1 / math.sqrt(2))
