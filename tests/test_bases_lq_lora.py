"""LQ-LoRA: alternating quantized + low-rank decomposition, Fisher weighting, mixed precision by ILP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from common.bases.blockwise import NF4, BlockQuantConfig, dequantize, fake_quantize
from common.bases.lq_lora import (
    RowColWeights,
    check_fisher_data,
    decomposition_error,
    low_rank_step,
    lq_decompose,
    row_col_weights,
)
from common.bases.mixed_precision import LQ_CONFIGS, choose_configs, error_table, mixed_precision_plan


def _low_rank_plus_noise(d_out=64, d_in=48, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g) + 0.3 * torch.randn(
        d_out, d_in, generator=g)


def test_full_rank_residual_is_zero():
    w = _low_rank_plus_noise()
    result = lq_decompose(w, rank=48, quantizer=NF4, iters=2)
    assert min(result.errors) <= 1e-9 * torch.linalg.norm(w)
    kept = decomposition_error(w, dequantize(result.q), result.l1, result.l2)
    assert kept <= 1e-5 * float(torch.linalg.norm(w))


@pytest.mark.parametrize("config", [BlockQuantConfig(2, 64, 8), BlockQuantConfig(3, 64, 0), NF4])
def test_best_iterate_is_kept_and_improves_on_the_first(config):
    w = _low_rank_plus_noise()
    result = lq_decompose(w, rank=4, quantizer=config, iters=6)
    assert len(result.errors) == 6
    assert result.errors[result.best] == min(result.errors)
    kept = decomposition_error(w, dequantize(result.q), result.l1, result.l2)
    assert kept == pytest.approx(min(result.errors), rel=1e-5)  # the returned factors are the best iterate's
    assert min(result.errors) < result.errors[0]  # alternating beats iteration 0 on a low-rank + noise matrix


def test_non_monotone_at_two_bits_keeps_an_earlier_iterate():
    """The paper's reason for keeping the best iterate: at 2 bits the error rises again after a few steps."""
    w = _low_rank_plus_noise()
    result = lq_decompose(w, rank=4, quantizer=BlockQuantConfig(2, 64, 8), iters=6)
    assert result.best < 5 and result.errors[-1] > min(result.errors)
    kept = decomposition_error(w, dequantize(result.q), result.l1, result.l2)
    assert kept == pytest.approx(min(result.errors), rel=1e-5)


def test_first_iterate_closed_form():
    """Iteration 0 is L = SVD_r(W), Q = quantize(W - L)."""
    w = _low_rank_plus_noise()
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    low_rank = (u[:, :4] * s[:4]) @ vh[:4]
    q = fake_quantize((w.double() - low_rank).float(), NF4).double()
    expected = float(torch.linalg.norm(w.double() - q - low_rank))
    assert lq_decompose(w, 4, NF4, iters=1).errors[0] == pytest.approx(expected, rel=1e-6)


def test_start_state_is_in_fedsvd_form():
    result = lq_decompose(_low_rank_plus_noise(), 4, NF4, iters=3)
    assert torch.allclose(result.l2 @ result.l2.T, torch.eye(4), atol=1e-5)
    norms = torch.linalg.norm(result.l1, dim=0)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-5)
    assert result.l1.abs().sum() > 0  # L1 starts non-zero (LQ-LoRA fine-tunes from the decomposition)


def test_weighted_step_is_optimal_for_the_weighted_objective():
    """L = D_r⁻¹ SVD_r(D_r R D_c) D_c⁻¹ attains Σ_{i>r} σ_i(D_r R D_c)², below the unweighted SVD_r(R)."""
    g = torch.Generator().manual_seed(1)
    residual = torch.randn(32, 24, generator=g, dtype=torch.float64)
    weights = RowColWeights(torch.rand(32, generator=g, dtype=torch.float64) + 0.1,
                            torch.rand(24, generator=g, dtype=torch.float64) + 0.1)
    zero = torch.zeros_like(residual)
    l1, l2 = low_rank_step(residual, 3, weights)
    weighted = decomposition_error(residual, zero, l1, l2, weights)
    sigma = torch.linalg.svdvals(weights.rows[:, None] * residual * weights.cols[None, :])
    assert weighted**2 == pytest.approx(float((sigma[3:] ** 2).sum()), rel=1e-8)
    p1, p2 = low_rank_step(residual, 3)
    assert weighted < decomposition_error(residual, zero, p1, p2, weights)
    assert torch.allclose(l2 @ l2.T, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_unit_weights_give_the_unweighted_decomposition():
    w = _low_rank_plus_noise()
    ones = RowColWeights(torch.ones(64), torch.ones(48))
    plain = lq_decompose(w, 4, NF4, iters=3)
    weighted = lq_decompose(w, 4, NF4, iters=3, weights=ones, fisher_data="public")
    assert np.allclose(plain.errors, weighted.errors, rtol=1e-6)


def test_row_col_weights_recover_a_rank_one_sqrt_fisher():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(16, generator=g) + 0.5, torch.rand(12, generator=g) + 0.5
    weights = row_col_weights(torch.outer(a, b) ** 2)
    assert torch.allclose(torch.outer(weights.rows, weights.cols).float(), torch.outer(a, b), rtol=1e-5)


def test_fisher_data_choices():
    check_fisher_data("none")
    check_fisher_data("public")
    with pytest.raises(ValueError, match="private.*not account"):
        check_fisher_data("private")
    with pytest.raises(ValueError, match="fisher_data = 'calib' is invalid"):
        check_fisher_data("calib")
    ones = RowColWeights(torch.ones(64), torch.ones(48))
    with pytest.raises(ValueError, match="fisher_data = 'public'"):
        lq_decompose(_low_rank_plus_noise(), 4, NF4, weights=ones)
    with pytest.raises(ValueError, match="private"):
        lq_decompose(_low_rank_plus_noise(), 4, NF4, weights=ones, fisher_data="private")
    with pytest.raises(ValueError, match="rank = 49"):
        lq_decompose(_low_rank_plus_noise(), 49, NF4)


def _brute_force(errors, bits, numels, budget):
    best, best_cost = None, np.inf
    numels = np.asarray(numels, dtype=float)
    for choice in itertools.product(range(errors.shape[1]), repeat=errors.shape[0]):
        used = sum(bits[c] * n for c, n in zip(choice, numels)) / numels.sum()
        cost = sum(errors[l, c] for l, c in enumerate(choice))
        if used <= budget and cost < best_cost:
            best, best_cost = list(choice), cost
    return best


def _average_bits(choice, bits, numels):
    return sum(bits[c] * n for c, n in zip(choice, numels)) / sum(numels)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budget", (2.5, 3.2, 4.0, 5.5))
def test_ilp_matches_brute_force_on_a_toy(seed, budget):
    rng = np.random.default_rng(seed)
    bits = np.array([2.13, 4.13, 8.13])
    errors = np.sort(rng.uniform(0.1, 10.0, size=(4, 3)), axis=1)[:, ::-1]  # more bits, less error
    numels = rng.integers(1_000, 10_000, size=4)
    chosen = choose_configs(errors, bits, numels, budget)
    assert _average_bits(chosen, bits, numels) <= budget + 1e-9
    assert chosen == _brute_force(errors, bits, numels, budget)


def test_ilp_on_real_decomposition_errors():
    weights = [_low_rank_plus_noise(32, 24, seed=s) for s in range(3)]
    configs = (LQ_CONFIGS[0], LQ_CONFIGS[4], LQ_CONFIGS[6])  # 2, 4, 8 bits at B0 = 64
    table = error_table(weights, rank=2, configs=configs, iters=2)
    assert np.all(table[:, 0] > table[:, 1]) and np.all(table[:, 1] > table[:, 2])
    bits = np.array([c.bits_per_param for c in configs])
    numels = [w.numel() for w in weights]
    for budget in (3.0, 4.5, 6.0):
        chosen = choose_configs(table, bits, numels, budget)
        assert chosen == _brute_force(table, bits, numels, budget)
        assert _average_bits(chosen, bits, numels) <= budget + 1e-9


def test_budget_below_the_smallest_config_is_a_clear_error():
    bits = np.array([c.bits_per_param for c in LQ_CONFIGS])
    with pytest.raises(ValueError, match=r"budget = 2.0 bits/param is below the smallest achievable 2.0635"):
        choose_configs(np.ones((2, len(bits))), bits, [100, 200], budget=2.0)


def test_budget_at_the_floor_picks_the_cheapest_everywhere():
    bits = np.array([2.0, 4.0, 8.0])
    chosen = choose_configs(np.array([[9.0, 5.0, 1.0]] * 3), bits, [10, 20, 30], budget=2.0)
    assert chosen == [0, 0, 0]


def test_mixed_precision_plan_spends_the_budget_where_it_helps():
    """A matrix with a heavy-tailed spectrum gets more bits than an easy low-rank one under a tight budget."""
    g = torch.Generator().manual_seed(4)
    easy = torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g)  # rank 2 = the LoRA rank
    hard = torch.randn(32, 32, generator=g)
    configs = (LQ_CONFIGS[0], LQ_CONFIGS[4])  # 2 or 4 bits
    plan = mixed_precision_plan({"easy": easy, "hard": hard}, rank=2, budget=3.2, configs=configs, iters=2)
    assert plan == {"easy": configs[0], "hard": configs[1]}
