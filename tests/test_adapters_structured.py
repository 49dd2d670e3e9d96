"""Closed forms of the structured adapters (Bone, Bat, Block-LoRA, Hydra, WaRA, SLTrain, SMoRA, Transformed LoRA,
DiffoRA), beyond the shared table."""

from __future__ import annotations

import copy
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
from server.strategies import check_compatible, get_strategy
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


def test_sltrain_update_is_lora_plus_the_values_scattered_on_a_support_rebuilt_from_seed_and_name():
    layer, config = wrapped("sltrain", d_in=30, d_out=20, rank=2, sltrain_density=0.05)
    randomize_trainables(layer, seed=10)
    rows, cols, values = layer.sltrain_S.rows, layer.sltrain_S.cols, layer.sltrain_S.weight.detach()
    assert len(values) == round(0.05 * 20 * 30) == 30
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 30, "the support has no repeated position"
    sparse = torch.zeros(20, 30)
    for i, j, v in zip(rows.tolist(), cols.tolist(), values.tolist()):
        sparse[i, j] = v
    lora = config.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    torch.testing.assert_close(layer.delta_weight().detach(), lora + sparse, atol=1e-6, rtol=1e-6)
    x = tokens(30)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + lora + sparse, layer.base.bias),
                               atol=1e-5, rtol=1e-5)
    assert get_adapter("sltrain").trainable_count(20, 30, config) == 2 * (20 + 30) + 30
    again, _ = wrapped("sltrain", d_in=30, d_out=20, rank=2, sltrain_density=0.05)
    assert torch.equal(again.sltrain_S.rows, rows) and torch.equal(again.sltrain_S.cols, cols)
    kind = get_adapter("sltrain")
    for other_config, other_name in ((config, "encoder.layer.1.query"),
                                     (kind.make_config(RunConfig(adapter="sltrain", rank=2, sltrain_density=0.05,
                                                                 seed=7)), "encoder.layer.0.query")):
        other = kind.wrap(nn.Linear(30, 20), other_config, other_name)
        assert not torch.equal(other.sltrain_S.rows * 30 + other.sltrain_S.cols, rows * 30 + cols)


def test_sltrain_per_sample_value_gradients_are_the_dense_ones_gathered_on_the_support_in_any_chunking():
    """Per example, Σ_t g_t x_tᵀ (a dense d_out x d_in gradient) read at Ω: by gathers in chunks of 1 and 7
    positions (dense path off), and by the batched matmul one, three and all examples at a time."""
    from common.adapters.sltrain import support_gradient

    generator = torch.Generator().manual_seed(3)
    g, x = torch.randn(4, 5, 6, generator=generator), torch.randn(4, 5, 9, generator=generator)
    rows, cols = torch.tensor([0, 0, 2, 5, 5, 3]), torch.tensor([1, 8, 4, 0, 7, 3])
    dense = torch.einsum("nto,nti->noi", g, x)
    for chunk in (1, 7 * 4 * 5, 2**22):
        torch.testing.assert_close(support_gradient(g, x, rows, cols, chunk_elements=chunk, dense_elements=0),
                                   dense[:, rows, cols])
    for examples_at_once in (1, 3, 4):
        torch.testing.assert_close(support_gradient(g, x, rows, cols, dense_elements=examples_at_once * 6 * 9),
                                   dense[:, rows, cols])


def test_sltrain_trains_only_on_its_support():
    """A gradient step on a layer changes its S only at Ω: the dense S stays zero off the support."""
    layer, _ = wrapped("sltrain", d_in=12, d_out=8, rank=2, sltrain_density=0.1)
    randomize_trainables(layer, seed=11)
    layer(tokens(12)).square().sum().backward()
    with torch.no_grad():
        layer.sltrain_S.weight -= 0.1 * layer.sltrain_S.weight.grad
    off = torch.ones(8, 12, dtype=torch.bool)
    off[layer.sltrain_S.rows, layer.sltrain_S.cols] = False
    dense = layer.sltrain_S.dense().detach()
    assert (dense[off] == 0).all() and (dense[~off] != 0).all()


def test_sltrain_density_outside_0_1_is_a_config_error():
    for density in (0.0, 1.5):
        with pytest.raises(ConfigError, match=f"sltrain-density = {density!r} is invalid"):
            RunConfig.from_flower({"adapter": "sltrain", "sltrain-density": density})


def smora(rank: int, top_k: int, d_in: int = 8, d_out: int = 6):
    layer, config = wrapped("smora", d_in=d_in, d_out=d_out, rank=rank, smora_top_k=top_k)
    randomize_trainables(layer, seed=12)
    return layer, config


def test_smora_with_every_rank_active_is_lora_weighted_by_the_router_probabilities():
    """k = r: h = W0 x + s B (softmax(W_g x) ⊙ A x); with a uniform router, LoRA at scale s / r."""
    layer, config = smora(rank=3, top_k=3)
    x = tokens(8)
    a, b, w_g = (layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.smora_router.weight.detach())
    expected = layer.base(x) + config.scaling * (torch.softmax(x @ w_g.T, -1) * (x @ a.T)) @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        layer.smora_router.weight.zero_()
    lora = LoRALinear(layer.base, LoRAConfig(rank=3, alpha=6.0 / 3), "query")  # scale s / r
    with torch.no_grad():
        lora.lora_A.weight.copy_(a)
        lora.lora_B.weight.copy_(b)
    torch.testing.assert_close(layer(x), lora(x), atol=1e-6, rtol=1e-5)


def test_smora_top_1_adds_one_rank_1_component_per_token_the_router_argmax():
    x = tokens(8)
    for k in (2, 3):
        assert ((smora(rank=4, top_k=k)[0].gates(x) != 0).sum(-1) == k).all()
    layer, config = smora(rank=4, top_k=1)
    gates = layer.gates(x).detach()
    assert ((gates != 0).sum(-1) == 1).all()
    logits = x @ layer.smora_router.weight.detach().T
    chosen = logits.argmax(-1)
    assert len(chosen.unique()) > 1, "the router must send different tokens to different experts"
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    for position in torch.cartesian_prod(torch.arange(5), torch.arange(3)).tolist():
        token, i = x[tuple(position)], int(chosen[tuple(position)])
        p = torch.softmax(logits[tuple(position)], -1)[i]
        expected = layer.base(token) + config.scaling * p * b[:, i] * (a[i] @ token)
        torch.testing.assert_close(layer(token), expected, atol=1e-6, rtol=1e-5)


def test_smora_router_per_sample_gradients_at_top_1_equal_one_example_at_a_time_and_are_not_zero():
    from opacus import GradSampleModule

    layer, _ = smora(rank=4, top_k=1)
    reference = copy.deepcopy(layer)
    x = tokens(8)
    wrapped_layer = GradSampleModule(layer, batch_first=True, loss_reduction="sum")
    wrapped_layer(x).square().sum().backward()
    samples = layer.smora_router.weight.grad_sample
    for n in range(len(x)):
        grad, = torch.autograd.grad(reference(x[n : n + 1]).square().sum(), reference.smora_router.weight)
        torch.testing.assert_close(samples[n], grad, atol=1e-5, rtol=1e-4)
        assert grad.abs().max() > 1e-4
    wrapped_layer._close()


def test_smora_top_k_outside_1_to_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="smora-top-k = 0 is invalid"):
        RunConfig.from_flower({"adapter": "smora", "smora-top-k": 0})
    with pytest.raises(ConfigError, match="smora-top-k = 4 must be between 1 and rank = 3"):
        wrapped("smora", d_in=8, d_out=6, rank=3, smora_top_k=4)


def test_fedsvd_refuses_smora_because_its_svd_rotates_the_experts_and_ffa_lora_keeps_them():
    for strategy in ("fedsvd", "fedsvd_het", "flexlora", "lora_lego"):
        assert get_strategy(strategy).reorders_ranks
    with pytest.raises(ConfigError, match="strategy 'fedsvd' re-factors B A into new ranks each round, but each "
                                          "rank of adapter 'smora' is one expert of its router, so the router would "
                                          "gate rotated ranks: use strategy 'fedavg_lora' or 'ffa_lora'"):
        check_compatible("fedsvd", "smora")
    check_compatible("ffa_lora", "smora")
    check_compatible("fedavg_lora", "smora")
    for adapter in ("sltrain", "transformed_lora", "diffora"):  # one lora_A / lora_B pair, no rank identity
        check_compatible("fedsvd", adapter)
        check_compatible("ffa_lora", adapter)


def one_layer_model(adapter: str, **settings) -> nn.Module:
    from common.adapters import inject_adapters

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("query", nn.Linear(8, 6))
    inject_adapters(model, RunConfig(adapter=adapter, rank=2, target_modules="query", **settings))
    return model


def test_a_smora_model_refuses_to_export_merged_before_changing_anything_and_intruders_skip_it():
    from common.adapters.smora import SMoRALinear
    from common.export import merge_into_base
    from common.intruders import model_intruders

    model = one_layer_model("smora", smora_top_k=1)
    w0 = model.query.base.weight.detach().clone()
    with pytest.raises(ConfigError, match="adapter 'smora' cannot be merged into the base weights: its router picks "
                                          "different ranks for every token"):
        merge_into_base(model)
    assert isinstance(model.query, SMoRALinear) and torch.equal(model.query.base.weight, w0)
    assert model_intruders(model) == {}
    assert set(model_intruders(one_layer_model("sltrain"))) == {"query"}


def test_transformed_lora_is_a_kronecker_transform_of_w0_plus_lora_with_the_bias_untouched():
    from common.adapters.transformed_lora import kronecker_shape

    assert [kronecker_shape(d) for d in (384, 1536, 10, 7)] == [(16, 24), (32, 48), (2, 5), (1, 7)]
    layer, config = wrapped("transformed_lora", d_in=5, d_out=6, rank=2)  # T_1: 2 x 2, T_2: 3 x 3
    assert get_adapter("transformed_lora").trainable_count(6, 5, config) == 4 + 9 + 2 * 11
    randomize_trainables(layer, seed=13)
    t1, t2 = layer.tlora_T1.weight.detach(), layer.tlora_T2.weight.detach()
    t = torch.zeros(6, 6)
    for a, b, c, d in torch.cartesian_prod(*(torch.arange(n) for n in (2, 3, 2, 3))).tolist():
        t[3 * a + b, 3 * c + d] = t1[a, c] * t2[b, d]
    torch.testing.assert_close(layer.transform().detach(), t)
    assert int(torch.linalg.matrix_rank(t)) == 6
    w0, b0 = layer.base.weight.detach(), layer.base.bias.detach()
    w = t @ w0 + config.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    x = tokens(5)
    torch.testing.assert_close(layer(x), F.linear(x, w, b0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w0 + layer.delta_weight().detach(), w, atol=1e-6, rtol=1e-5)


def test_transformed_lora_with_a_diagonal_transform_rescales_the_rows_of_w0_as_doras_magnitude():
    layer, _ = wrapped("transformed_lora", d_in=5, d_out=6, rank=2)
    scale_1, scale_2 = torch.tensor([2.0, -0.5]), torch.tensor([1.5, 0.25, 3.0])
    with torch.no_grad():
        layer.tlora_T1.weight.copy_(torch.diag(scale_1))
        layer.tlora_T2.weight.copy_(torch.diag(scale_2))
    w0 = layer.base.weight.detach()
    adapted = w0 + layer.delta_weight().detach()
    row_scale = torch.kron(scale_1, scale_2)
    torch.testing.assert_close(adapted, row_scale[:, None] * w0)
    torch.testing.assert_close(adapted.norm(dim=1), row_scale.abs() * w0.norm(dim=1))


def diffora_toy_model(modules: str = "") -> nn.Module:
    """Four candidate layers; `blocks.2` and `blocks.3` feed nothing the loss reads."""
    from common.adapters import inject_adapters

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential() for _ in range(4))
            for block in self.blocks:
                block.add_module("query", nn.Linear(6, 6))

        def forward(self, x):
            outs = [block.query(x) for block in self.blocks]
            return outs[0] + outs[1] + 0.0 * (outs[2] + outs[3])

    torch.manual_seed(0)
    model = Toy()
    model.requires_grad_(False)
    inject_adapters(model, RunConfig(adapter="diffora", rank=2, target_modules="query", diffora_modules=modules))
    return model


def test_diffora_gives_lora_to_the_kept_modules_and_the_others_no_trainable_tensor():
    from common.adapters.diffora import UnselectedLinear
    from common.adapters.lora import LoRALinear as PlainLoRA
    from common.payload import trainable_state

    model = diffora_toy_model("blocks.1.query, blocks.3.query")
    assert set(trainable_state(model)) == {f"blocks.{i}.query.lora_{f}.weight" for i in (1, 3) for f in "AB"}
    assert isinstance(model.blocks[1].query, PlainLoRA) and isinstance(model.blocks[0].query, UnselectedLinear)
    assert not any(p.requires_grad for p in model.blocks[0].parameters())
    x = torch.randn(3, 6)
    torch.testing.assert_close(model.blocks[0].query(x), model.blocks[0].query.base(x), atol=0, rtol=0)
    assert len(trainable_state(diffora_toy_model(""))) == 8, "no selection: every candidate keeps its LoRA"


def diffora_search(seed: int) -> dict[str, float]:
    from common.diffora_selection import search_gates

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 6, generator=generator)
    target = x @ torch.randn(6, 6, generator=generator)  # reachable only through blocks 0 and 1
    batches = list(zip(x, target))

    def loss(model, batch):
        return F.mse_loss(model(batch[0]), batch[1])

    return search_gates(diffora_toy_model(), batches[:2], batches[2:], loss, steps=15, lr=0.05)


def test_diffora_selection_keeps_the_modules_that_matter_and_is_deterministic():
    from common.diffora_selection import discretize

    logits = diffora_search(seed=1)
    assert logits == diffora_search(seed=1)
    assert logits["blocks.2.query"] == logits["blocks.3.query"] == 0.0, "a module the loss ignores gets no gradient"
    assert min(logits["blocks.0.query"], logits["blocks.1.query"]) > 0.1
    assert discretize(logits, 0.5) == ("blocks.0.query", "blocks.1.query")
    assert discretize(logits, 0.25) == ("blocks.0.query",) or discretize(logits, 0.25) == ("blocks.1.query",)
    assert discretize({"b": 0.0, "a": 0.0, "c": -1.0}, 0.01) == ("a",), "at least one, ties by name"


def test_a_diffora_gate_at_plus_infinity_is_plain_lora_and_at_zero_half_of_it():
    from common.diffora_selection import GatedLayer

    layer, _ = wrapped("diffora", d_in=8, d_out=6, rank=2)
    randomize_trainables(layer, seed=14)
    gate = GatedLayer(layer)
    x = tokens(8)
    torch.testing.assert_close(gate(x), layer.base(x) + 0.5 * layer.branch(x))
    with torch.no_grad():
        gate.logit.fill_(100.0)
    torch.testing.assert_close(gate(x), layer(x), atol=0, rtol=0)


def test_diffora_refuses_a_selection_on_private_data_and_carves_the_public_split_out_of_the_clients_data():
    from common.data.partition import uses_public_split

    with pytest.raises(ConfigError, match="adapter 'diffora' selects its modules on the server's public split only"):
        get_adapter("diffora").make_config(RunConfig(adapter="diffora", init_data="private"))
    assert uses_public_split(RunConfig(adapter="diffora")) and not uses_public_split(RunConfig(adapter="lora"))
    with pytest.raises(ConfigError, match="diffora-keep = 0.0 is invalid"):
        RunConfig.from_flower({"adapter": "diffora", "diffora-keep": 0.0})


@pytest.mark.slow
def test_diffora_selection_on_the_public_split_of_the_real_model_is_deterministic():
    """About 5 s (dataset and model load): the driver the README tells users to run before a DiffoRA run."""
    from common.diffora_selection import select_on_public_split

    config = RunConfig(adapter="diffora", rank=4, public_examples=16, batch_size=8, max_seq_len=16, diffora_keep=0.25)
    kept = select_on_public_split(config, steps=3)
    assert len(kept) == 3 and all(name.startswith("bert.encoder.layer.") for name in kept)  # 12 candidates
    assert select_on_public_split(config, steps=3) == kept
