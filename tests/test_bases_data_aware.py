"""The data-aware bases on tiny layers and a tiny BERT: LQ-LoRA's Fisher weighting (the diagonal empirical
Fisher against per-example brute force, the weighted low-rank step against a numerical optimum) and EoRA on
QLoRAM and LQ-LoRA bases (the activation-weighted error, and QLoRAM's served model W0 + s (B A - B0 A0))."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from common.adapters import inject_adapters
from common.adapters.rank_resize import fit_ranks
from common.bases.eora_init import calibration_reference, eora_initialise, input_covariances, trained_change
from common.bases.fisher import diagonal_fisher
from common.bases.lq_lora import decomposition_error, low_rank_step, row_col_weights
from common.bases.lq_lora_model import apply_lq_lora
from common.bases.pruning import prune_bert
from common.bases.replace import frozen_base_linears, quantize_frozen_base
from common.config import RunConfig
from common.data.partition import uses_public_split
from common.errors import ConfigError
from common.export import adapted_with
from common.model import AdaptedModel
from common.payload import load_state, trainable_state
from server.bases import recovered
from tests.test_bases_models import LORA, RANK, _bert, _lora_layers


def _data(seed=3, n=8, length=9, pad_from=6):
    ids = torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[: n // 2, pad_from:] = 0  # half the examples padded: padding is no part of the Fisher or calibration
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return torch.utils.data.TensorDataset(ids, mask, labels)


def _weighted(residual, fisher):
    return float((fisher * residual.square()).sum())


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient():
    model = _bert()
    inject_adapters(model, LORA)
    names = frozen_base_linears(model)
    data = _data(n=6)
    fisher = diagonal_fisher(model, names, data, batch_size=4)  # a last batch of 2
    brute = copy.deepcopy(model).double().eval()
    weights = {name: brute.get_submodule(name).weight for name in names}
    for weight in weights.values():
        weight.requires_grad_(True)
    expected = {name: torch.zeros_like(weight) for name, weight in weights.items()}
    for input_ids, mask, label in data:  # one example at a time, its padding kept (it must not matter)
        logits = brute(input_ids=input_ids[None], attention_mask=mask[None]).logits
        grads = torch.autograd.grad(F.cross_entropy(logits, label[None]), list(weights.values()))
        for name, grad in zip(weights, grads):
            expected[name] += grad.square() / len(data)
    assert set(fisher) == set(names) and any(name.endswith("query.base") for name in names)
    for name in names:
        assert fisher[name].dtype == torch.float64
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-9, atol=1e-18)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "classifier" not in n)


def _rank_one_fisher(d_out=7, d_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(d_out, generator=g, dtype=torch.float64) * 3 + 0.05
    cols = torch.rand(d_in, generator=g, dtype=torch.float64) * 3 + 0.05
    return torch.outer(rows, cols), torch.randn(d_out, d_in, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_weighted_step_is_the_optimum_of_the_fisher_weighted_objective(seed):
    """For a rank-1 F the closed form D_r⁻¹ SVD_r(D_r R D_c) D_c⁻¹ minimises Σ F ⊙ (R - L1 L2)²: it beats the
    unweighted SVD in that objective and matches a numerical optimum found by L-BFGS from random starts."""
    fisher, residual = _rank_one_fisher(seed=seed)
    rank = 2
    l1, l2 = low_rank_step(residual, rank, row_col_weights(fisher))
    closed = _weighted(residual - l1 @ l2, fisher)
    p1, p2 = low_rank_step(residual, rank)
    assert closed <= _weighted(residual - p1 @ p2, fisher) + 1e-12
    best = float("inf")
    for start in range(3):
        g = torch.Generator().manual_seed(100 + start)
        b = torch.randn(7, rank, generator=g, dtype=torch.float64).requires_grad_(True)
        a = torch.randn(rank, 5, generator=g, dtype=torch.float64).requires_grad_(True)
        optimiser = torch.optim.LBFGS([b, a], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                      line_search_fn="strong_wolfe")

        def objective():
            optimiser.zero_grad()
            loss = (fisher * (residual - b @ a).square()).sum()
            loss.backward()
            return loss
        optimiser.step(objective)
        best = min(best, float(objective().detach()))
    assert closed == pytest.approx(best, rel=1e-7, abs=1e-12)
    assert decomposition_error(residual, torch.zeros_like(residual), l1, l2, row_col_weights(fisher)) ** 2 \
        == pytest.approx(closed, rel=1e-9)


def test_uniform_fisher_gives_the_unweighted_decomposition_of_a_whole_model():
    model = _bert()
    inject_adapters(model, LORA)
    plain, weighted = copy.deepcopy(model), copy.deepcopy(model)
    uniform = {name: torch.full_like(model.get_submodule(name).weight, 3.7, dtype=torch.float64)
               for name in frozen_base_linears(model)}
    apply_lq_lora(plain, RANK, iters=2)
    apply_lq_lora(weighted, RANK, iters=2, fisher=uniform)
    for name, layer in _lora_layers(plain).items():
        other = weighted.get_submodule(name)
        assert torch.equal(layer.base.codes, other.base.codes)
        torch.testing.assert_close(other.delta_weight(), layer.delta_weight(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="the Fisher lacks"):
        apply_lq_lora(copy.deepcopy(model), RANK, fisher={})


def test_fisher_weighted_lq_lora_on_a_model_weights_the_low_rank_step():
    model = _bert()
    inject_adapters(model, LORA)
    fisher = diagonal_fisher(model, frozen_base_linears(model), _data(), batch_size=4)
    weights = {name: m.base.weight.detach().clone() for name, m in _lora_layers(model).items()}
    apply_lq_lora(model, RANK, iters=1, fisher=fisher)
    for name, layer in _lora_layers(model).items():
        scaled = row_col_weights(fisher[f"{name}.base"])
        l1, l2 = low_rank_step(weights[name], RANK, scaled)  # iteration 0: L1 L2 = the weighted SVD_r(W)
        torch.testing.assert_close(layer.delta_weight().double(), l1 @ l2, rtol=1e-4, atol=1e-6)
        a = layer.lora_A.weight
        torch.testing.assert_close(a @ a.T, torch.eye(RANK), atol=1e-5, rtol=0)


def _calibrated(model, reference, data):
    """{layer: (E, C, ΔW)} after EoRA's init of `model` against `reference`."""
    covariances = input_covariances(model, data, 4, torch.device("cpu"))
    eora_initialise(model, reference, data, 4, torch.device("cpu"))
    out = {}
    for name, layer in _lora_layers(model).items():
        error = reference.get_submodule(name).base.weight.double() - layer.base.weight.double()
        out[name] = (error, covariances[name], layer.delta_weight().double())
    return out


def _activation_error(residual, covariance):
    return float(torch.trace(residual @ covariance @ residual.T).detach())


def test_eora_on_qloram_compensates_the_nf4_error_of_the_pruned_layers():
    pruned = prune_bert(_bert(), 0.5)
    reference = pruned.model  # the pruned fp32 model: what `calibration_reference` builds for qloram
    inject_adapters(reference, LORA)
    model = copy.deepcopy(reference)
    quantize_frozen_base(model)
    assert model.bert.encoder.layer[0].intermediate.dense.base.out_features == 32  # pruned shapes
    for name, (error, covariance, delta) in _calibrated(model, reference, _data()).items():
        assert _activation_error(error - delta, covariance) < _activation_error(error, covariance)


def test_eora_on_lq_lora_keeps_q_and_beats_l1_l2_in_the_activation_metric():
    reference = _bert()
    inject_adapters(reference, LORA)
    model = copy.deepcopy(reference)
    apply_lq_lora(model, RANK, iters=1)
    codes = {name: layer.base.codes.clone() for name, layer in _lora_layers(model).items()}
    start = {name: layer.delta_weight().double() for name, layer in _lora_layers(model).items()}
    for name, (error, covariance, delta) in _calibrated(model, reference, _data()).items():
        assert torch.equal(model.get_submodule(name).base.codes, codes[name])  # the base is LQ-LoRA's Q
        assert _activation_error(error - delta, covariance) <= _activation_error(error - start[name], covariance)
        a = model.get_submodule(name).lora_A.weight
        torch.testing.assert_close(a @ a.T, torch.eye(RANK), atol=1e-5, rtol=0)


def test_qloram_with_eora_serves_w0_plus_the_recovered_trained_change():
    """Full model = W0 + s E_out (B A - B0 A0) E_inᵀ: on kept coordinates s (B A - B0 A0), zero elsewhere,
    and exactly W0 while the adapter is still at its EoRA start."""
    full = _bert()
    pruned = prune_bert(full, 0.5)
    inject_adapters(full, LORA)
    inject_adapters(pruned.model, LORA)
    quantize_frozen_base(pruned.model)
    with torch.no_grad():
        for i, p in enumerate(p for n, p in pruned.model.named_parameters() if "lora_" in n):
            p.normal_(generator=torch.Generator().manual_seed(i))
    start = {k: v for k, v in trainable_state(pruned.model).items() if "lora_" in k}
    with torch.no_grad():  # training moves B (FedSVD trains B; A may be re-factored too)
        for i, p in enumerate(p for n, p in pruned.model.named_parameters() if "lora_" in n):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + i)))
    state = trainable_state(pruned.model)
    wrap = lambda m, maps=None: AdaptedModel(model=m, tokenizer=None, adapted_modules=[], head_parameters=[],
                                             index_maps=maps)
    for current, trained in ((state, True), (dict(state, **start), False)):
        served = copy.deepcopy(full)
        full_state = recovered(current, wrap(pruned.model, pruned.index_maps), wrap(served), start)
        fit_ranks(served, full_state)
        load_state(served, full_state)
        for name, layer in _lora_layers(served).items():
            small = pruned.model.get_submodule(name)
            kept_out, kept_in = pruned.index_maps.get(name, (None, None))
            rows = torch.arange(layer.base.out_features) if kept_out is None else kept_out
            cols = torch.arange(layer.base.in_features) if kept_in is None else kept_in
            b0 = torch.from_numpy(start[f"{name}.lora_B.weight"]).double()
            a0 = torch.from_numpy(start[f"{name}.lora_A.weight"]).double()
            change = small.scaling * (small.lora_B.weight.double() @ small.lora_A.weight.double() - b0 @ a0)
            delta = layer.delta_weight().detach().double()
            assert layer.scaling == small.scaling and layer.lora_A.out_features == 2 * RANK
            if not trained:
                assert float(delta.abs().max()) < 1e-5  # float32 cancellation of B A - B0 A0 only
                continue
            torch.testing.assert_close(delta[rows][:, cols], change, rtol=1e-5, atol=1e-6)
            outside = torch.ones_like(delta, dtype=torch.bool)
            outside[rows[:, None], cols[None, :]] = False
            assert torch.all(delta[outside] == 0)
    stacked = trained_change(state, start)
    key = next(k for k in start if ".lora_A." in k)
    assert stacked[key].shape[0] == 2 * RANK and set(stacked) == set(state)


def test_settings_of_the_data_aware_bases():
    fisher = RunConfig.from_flower({"base": "lq_lora", "lq-fisher": "public"})
    assert uses_public_split(fisher) and not uses_public_split(dataclasses.replace(fisher, lq_fisher="none"))
    for base in ("nf4", "qloram", "lq_lora"):
        assert uses_public_split(RunConfig.from_flower({"base": base, "base-init": "eora"}))
    qloram = RunConfig.from_flower({"base": "qloram", "base-init": "eora"})
    assert calibration_reference(qloram).base == "loram" and calibration_reference(qloram).base_init == "none"
    assert calibration_reference(fisher).base == "fp32" and calibration_reference(fisher).lq_fisher == "none"
    with pytest.raises(ConfigError, match="eora_start.safetensors"):
        adapted_with(qloram, {}, ["a", "b", "c"])


@pytest.mark.slow  # the real MiniLM: its Fisher on 16 public examples, three LQ-LoRA bases (2.5 CPU-min; 6 min on 2 loaded cores)
def test_fisher_lq_lora_on_minilm_is_reproducible_and_differs_from_the_data_free_base(tmp_path):
    from common.model import _template, build_model
    from tests.conftest import write_toy_csv

    config = RunConfig(dataset=str(write_toy_csv(tmp_path)), examples_per_class=0, max_seq_len=16, rank=4,
                       base="lq_lora", lq_fisher="public", lq_iters=1, public_examples=16)
    first = build_model(config, num_labels=3)
    _template.cache_clear()  # a second party building the same base from scratch
    assert build_model(config, num_labels=3).base_sha256 == first.base_sha256
    assert build_model(dataclasses.replace(config, lq_fisher="none"), num_labels=3).base_sha256 != first.base_sha256
