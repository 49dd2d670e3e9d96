"""One table over every registered adapter: the properties each must have to be federated under DP.

A new adapter gets every check here by being registered; nothing below names a method except to pick
the adapters' expected behaviour from the registry itself.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from common.adapters import ADAPTERS, get_adapter
from common.config import RunConfig
from common.errors import ConfigError
from common.payload import from_record, load_state, to_record, trainable_state
from server.aggregation import weighted_mean
from server.strategies import STRATEGIES, check_compatible

D_IN, D_OUT, RANK, TOKENS, CLASSES = 12, 10, 3, 4, 5
NAMES = sorted(ADAPTERS)


def base_linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT)


def adapter_layer(name: str, base: nn.Linear | None = None):
    kind = get_adapter(name)
    config = kind.make_config(RunConfig(adapter=name, rank=RANK, alpha=6.0))
    return kind.wrap(base if base is not None else base_linear(), config, "encoder.layer.0.query"), config


def randomize_trainables(layer: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def inputs(n: int = 6) -> torch.Tensor:
    return torch.randn(n, TOKENS, D_IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_adapter_leaves_the_base_output_unchanged(name):
    layer, _ = adapter_layer(name)
    x = inputs()
    torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize("name", NAMES)
def test_merge_matches_the_branch_and_unmerge_restores_the_base_weight(name):
    layer, _ = adapter_layer(name)
    randomize_trainables(layer, seed=2)
    w0 = layer.base.weight.detach().clone()
    x = inputs()
    unmerged = layer(x)
    assert (unmerged - layer.base(x)).abs().max() > 1e-3, "the randomized adapter must change the output"
    if not layer.mergeable:  # an input-dependent update: merging must refuse, with the reason, and change nothing
        for fold in (layer.merge, layer.delta_weight):
            with pytest.raises(ConfigError, match=f"adapter '{name}' cannot be merged into the base weights: "):
                fold()
        assert not layer.merged and torch.equal(layer.base.weight, w0)
        torch.testing.assert_close(layer(x), unmerged, atol=0, rtol=0)
        return
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base.weight - w0, layer.delta_weight(), atol=1e-6, rtol=1e-5)
    layer.merge()  # idempotent
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_trainable_tensors_and_count_match_the_declaration(name):
    kind = get_adapter(name)
    layer, config = adapter_layer(name)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{factor}.weight" for factor in kind.trainable_factors}
    assert sum(p.numel() for p in trainable.values()) == kind.trainable_count(D_OUT, D_IN, config)
    assert not list(layer.buffers()), "Opacus: a module with trainable parameters must not own buffers"
    assert kind.grad_sample_mode in ("hooks", "functorch")
    for module in layer.modules() if kind.grad_sample_mode == "hooks" else []:
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            assert type(module) in GradSampleModule.GRAD_SAMPLERS, (
                f"{type(module).__name__} has no registered Opacus grad sampler (slow functorch fallback)")


class Probe(nn.Module):
    """adapter -> mean over tokens -> frozen head: a per-example loss for gradient checks."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(D_OUT, CLASSES).requires_grad_(False)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=1))


MODES = sorted({(name, mode) for name in NAMES for mode in ("hooks", get_adapter(name).grad_sample_mode)})


@pytest.mark.parametrize("name,mode", MODES)
def test_opacus_per_sample_gradients_equal_one_example_at_a_time(name, mode):
    """In hooks mode, and in the mode the adapter declares for DP-SGD (if another)."""
    layer, _ = adapter_layer(name)
    randomize_trainables(layer, seed=3)
    probe = Probe(layer)
    reference = copy.deepcopy(probe)
    x, y = inputs(), torch.arange(6) % CLASSES
    wrapped = GradSampleModule(probe, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    params = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    samples = dict(probe.named_parameters())
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]), [p for _, p in params])
        for (param_name, _), grad in zip(params, grads):
            torch.testing.assert_close(samples[param_name].grad_sample[i], grad, atol=1e-5, rtol=1e-4,
                                       msg=f"{name}: per-sample gradient of {param_name}, example {i}")
    wrapped._close()


@pytest.mark.parametrize("name", NAMES)
def test_payload_round_trip_is_lossless(name):
    sender, _ = adapter_layer(name)
    randomize_trainables(sender, seed=4)
    receiver, _ = adapter_layer(name)
    load_state(receiver, from_record(to_record(trainable_state(sender))))
    x = inputs()
    torch.testing.assert_close(receiver(x), sender(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_averaging_is_exact_exactly_when_declared(name):
    """Exact adapters: the layer built from averaged payloads has the average of the clients' ΔW."""
    kind = get_adapter(name)
    clients, weights = [], [1.0, 2.0, 5.0]
    for seed in range(3):
        layer, _ = adapter_layer(name)
        randomize_trainables(layer, seed=10 + seed)
        clients.append(layer)
    averaged_layer, _ = adapter_layer(name)
    load_state(averaged_layer, weighted_mean([trainable_state(c) for c in clients], weights))
    x = inputs()  # an adapter without a single ΔW is compared by its effect on inputs, ΔW x
    effect = (lambda layer: layer.delta_weight()) if averaged_layer.mergeable else (lambda layer: layer.branch(x))
    mean_delta = sum(w * effect(c) for c, w in zip(clients, weights)) / sum(weights)
    gap = float((effect(averaged_layer) - mean_delta).abs().max())
    if kind.exact_averaging:
        assert gap < 1e-5
    else:
        assert gap > 1e-3, f"{name} is declared inexact but averaged exactly; declare it exact"


def test_unknown_adapter_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown adapter 'loha'; available: " + ", ".join(NAMES)):
        get_adapter("loha")


@pytest.mark.parametrize("name", NAMES)
def test_rank_larger_than_the_layer_is_a_config_error(name):
    from common.adapters import inject_adapters

    model = nn.Sequential()
    model.add_module("query", nn.Linear(4, 6))
    with pytest.raises(ConfigError, match="rank = 5 exceeds layer query \\(6 x 4\\); use rank <= 4"):
        inject_adapters(model, RunConfig(adapter=name, rank=5, target_modules="query"))


def test_salt_lora_rank_larger_than_the_layer_is_a_config_error():
    from common.adapters import inject_adapters

    model = nn.Sequential()
    model.add_module("query", nn.Linear(4, 6))
    with pytest.raises(ConfigError, match="salt-lora-rank = 5 exceeds layer query \\(6 x 4\\); use salt-lora-rank <= 4"):
        inject_adapters(model, RunConfig(adapter="salt", rank=2, salt_lora_rank=5, target_modules="query"))


def test_salt_lora_rank_of_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="salt-lora-rank = 0 is invalid"):
        RunConfig.from_flower({"adapter": "salt", "salt-lora-rank": 0})


@pytest.mark.parametrize("name", NAMES)
def test_every_adapter_has_a_strategy_and_incompatible_pairs_are_refused(name):
    kind = get_adapter(name)
    usable = [s for s, cls in STRATEGIES.items() if set(cls.required_factors) <= set(kind.trainable_factors)
              and (not cls.adapters or name in cls.adapters)
              and not (cls.reorders_ranks and kind.rank_identity_matters)]
    assert usable, f"no strategy can aggregate {name}"
    for strategy in STRATEGIES:
        if strategy in usable:
            check_compatible(strategy, name)
        else:
            with pytest.raises(ConfigError, match=f"strategy '{strategy}' (needs an adapter with lora_A and lora_B"
                                                  f"|merges adapter\\(s\\) lora only, not '{name}'"
                                                  f"|re-factors B A into new ranks each round)"):
                check_compatible(strategy, name)


def test_lora_xs_frozen_factors_are_the_truncated_svd_of_w0():
    layer, _ = adapter_layer("lora_xs")
    w0 = layer.base.weight.detach().double()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    a, b = layer.frozen_A.weight.double(), layer.frozen_B.weight.double()
    torch.testing.assert_close(a @ a.T, torch.eye(RANK, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(b @ a, (u[:, :RANK] * s[:RANK]) @ vh[:RANK], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(adapter_layer("lora_xs")[0].frozen_A.weight.numpy(), a.float().numpy())


def test_lamda_projections_are_orthonormal_singular_vectors_so_the_core_maps_isometrically():
    layer, config = adapter_layer("lamda")
    u, _, vh = torch.linalg.svd(layer.base.weight.detach().double(), full_matrices=False)
    a, b = layer.frozen_A.weight.double(), layer.frozen_B.weight.double()
    torch.testing.assert_close((b.T @ u[:, :RANK]).abs(), torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close((a @ vh[:RANK].T).abs(), torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    randomize_trainables(layer, seed=6)
    torch.testing.assert_close(torch.linalg.norm(layer.delta_weight()),
                               config.scaling * torch.linalg.norm(layer.lora_R.weight), rtol=1e-5, atol=0)


def test_dora_rows_have_the_trained_magnitude_and_start_at_the_base_norms():
    layer, config = adapter_layer("dora")
    w0 = layer.base.weight.detach().clone()
    torch.testing.assert_close(layer.lora_magnitude_vector.weight, torch.linalg.norm(w0, dim=1))
    randomize_trainables(layer, seed=7)
    adapted = w0 + layer.delta_weight()
    torch.testing.assert_close(torch.linalg.norm(adapted, dim=1), layer.lora_magnitude_vector.weight.abs(),
                               atol=1e-5, rtol=1e-5)
    direction = w0 + config.scaling * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(adapted / adapted.norm(dim=1, keepdim=True),
                               direction / direction.norm(dim=1, keepdim=True)
                               * layer.lora_magnitude_vector.weight.sign()[:, None], atol=1e-5, rtol=1e-5)


def test_svfit_trains_the_top_singular_values_of_w0():
    """With δ = σ_r the update is the best rank-r approximation U_r Σ_r V_rᵀ of W0 (Eckart-Young)."""
    layer, _ = adapter_layer("svfit")
    w0 = layer.base.weight.detach().double()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    with torch.no_grad():
        layer.lora_S.weight.copy_(s[:RANK].float())
    torch.testing.assert_close(layer.delta_weight().double(), (u[:, :RANK] * s[:RANK]) @ vh[:RANK], atol=1e-5, rtol=0)


def test_loldu_bases_are_the_lu_factors_of_w0():
    """At full rank, P L diag(D) U rebuilds W0 exactly; at rank r the bases are its leading part."""
    from common.adapters.decompositions import lu_bases

    w0 = base_linear().weight.detach()
    left, right, pivots = lu_bases(w0, min(D_IN, D_OUT))
    torch.testing.assert_close((left * pivots) @ right, w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.diagonal(right), torch.ones(min(D_IN, D_OUT)))  # unit-upper
    layer, _ = adapter_layer("loldu")
    torch.testing.assert_close(layer.frozen_left.weight, left[:, :RANK])
    torch.testing.assert_close(layer.frozen_right.weight, right[:RANK])


def test_nola_bases_are_rebuilt_from_the_seed_and_only_coefficients_train():
    first, config = adapter_layer("nola")
    again, _ = adapter_layer("nola")
    torch.testing.assert_close(first.nola_A.bases, again.nola_A.bases, atol=0, rtol=0)
    other = get_adapter("nola").wrap(base_linear(), config, "encoder.layer.1.query")
    assert (other.nola_A.bases - first.nola_A.bases).abs().max() > 0.01, "each layer gets its own bases"
    randomize_trainables(first, seed=5)
    a = torch.einsum("k,koi->oi", first.nola_A.weight, first.nola_A.bases)
    b = torch.einsum("k,koi->oi", first.nola_B.weight, first.nola_B.bases)
    torch.testing.assert_close(first.delta_weight(), config.scaling * b @ a)
    assert first.nola_A.bases.shape == (config.num_bases, RANK, D_IN)


def test_nola_basis_count_of_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="nola-bases = 0 is invalid"):
        RunConfig.from_flower({"adapter": "nola", "nola-bases": 0})


def test_salt_starts_at_w0_and_its_lora_stays_off_the_top_singular_subspaces():
    """a = 1, b = 0, LoRA zero: W == W0. Trained: ΔW = U_r diag(ReLU(aσ + b) − σ) V_rᵀ + s P_U B A P_V."""
    layer, config = adapter_layer("salt")
    torch.testing.assert_close(layer.delta_weight(), torch.zeros(D_OUT, D_IN), atol=0, rtol=0)
    randomize_trainables(layer, seed=9)
    u, s, vh = torch.linalg.svd(layer.base.weight.detach().double(), full_matrices=False)
    u, s, vh = u[:, :RANK], s[:RANK], vh[:RANK]
    a, b = layer.salt_scale.weight.detach().double(), layer.salt_shift.weight.detach().double()
    lora = layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
    p_out, p_in = torch.eye(D_OUT, dtype=torch.float64) - u @ u.T, torch.eye(D_IN, dtype=torch.float64) - vh.T @ vh
    expected = (u * (torch.relu(a * s + b) - s)) @ vh + config.scaling * p_out @ lora @ p_in
    torch.testing.assert_close(layer.delta_weight().detach().double(), expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # the LoRA part alone leaves the top-r singular directions untouched
        layer.salt_scale.weight.fill_(1.0)
        layer.salt_shift.weight.zero_()
    lora_part = layer.delta_weight().detach().double()
    assert lora_part.abs().max() > 1e-3
    torch.testing.assert_close(u.T @ lora_part, torch.zeros(RANK, D_IN, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(lora_part @ vh.T, torch.zeros(D_OUT, RANK, dtype=torch.float64), atol=1e-6, rtol=0)


def test_salt_scale_and_shift_per_sample_gradients_are_exact_where_the_relu_clips():
    layer, _ = adapter_layer("salt")
    randomize_trainables(layer, seed=8)
    sigma = layer.salt_scale.singular_values
    with torch.no_grad():
        layer.salt_scale.weight.fill_(1.0)
        layer.salt_shift.weight.zero_()
        layer.salt_shift.weight[0] = -2 * sigma[0]  # σ'_0 = ReLU(σ_0 − 2σ_0) = 0
        layer.salt_scale.weight[1] = -1.0  # σ'_1 = ReLU(−σ_1) = 0
    reference = copy.deepcopy(layer)
    probe = Probe(layer)
    x, y = inputs(), torch.arange(6) % CLASSES
    wrapped = GradSampleModule(probe, batch_first=True, loss_reduction="sum", force_functorch=False)
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    factors = [reference.salt_scale.weight, reference.salt_shift.weight]
    samples = [layer.salt_scale.weight.grad_sample, layer.salt_shift.weight.grad_sample]
    for i in range(len(x)):  # per example, through the dense W0 + ΔW with autograd's own ReLU
        dense = F.linear(x[i : i + 1], reference.base.weight + reference.delta_weight(), reference.base.bias)
        loss = F.cross_entropy(probe.head(dense.mean(dim=1)), y[i : i + 1])
        for sample, grad in zip(samples, torch.autograd.grad(loss, factors)):
            torch.testing.assert_close(sample[i], grad, atol=1e-5, rtol=1e-4)
    for sample in samples:
        assert (sample[:, :2] == 0).all() and (sample[:, 2:].abs() > 1e-6).any()
    wrapped._close()


@pytest.mark.parametrize("d_out, d_in", [(16, 24), (24, 16)])
def test_randlora_update_is_full_rank_from_rank_4_bases_shared_as_slices(d_out, d_in):
    """N = 16 / 4 = 4 bases of rank 4: rank(ΔW) = min(d_in, d_out) = 16, on either side; the bases of a
    layer are slices of a larger layer's (PEFT shares one pair, sized for the largest layer)."""
    kind = get_adapter("randlora")
    config = kind.make_config(RunConfig(adapter="randlora", rank=4))
    torch.manual_seed(0)
    layer = kind.wrap(nn.Linear(d_in, d_out).double(), config, "encoder.layer.0.query")
    assert layer.delta_weight().abs().max() == 0
    assert kind.trainable_count(d_out, d_in, config) == 4 * 4 + 4 * 16
    randomize_trainables(layer, seed=9)
    delta = layer.delta_weight()
    assert delta.dtype == torch.float64 and delta.shape == (d_out, d_in)
    assert int(torch.linalg.matrix_rank(delta)) == 16
    larger = kind.wrap(nn.Linear(40, 30), config, "encoder.layer.5.value")
    torch.testing.assert_close(layer.randlora_gamma.basis.float(), larger.randlora_gamma.basis[:, :16], atol=0, rtol=0)
    q_small = layer.frozen_B.weight.T if layer.transposed else layer.frozen_B.weight  # M x (N r), basis-major
    q_large = larger.frozen_B.weight.T.reshape(40, 8, 4)  # larger is 30 x 40: transposed, M = 40, N = 8
    torch.testing.assert_close(q_small.float(), q_large[:24, :4].flatten(1), atol=0, rtol=0)


def test_randlora_per_sample_gradients_are_exact_with_gamma_on_the_input_side():
    """The table's layer (12 -> 10) puts γ on the output side; this one (8 -> 10) on the input side."""
    kind = get_adapter("randlora")
    torch.manual_seed(0)
    layer = kind.wrap(nn.Linear(8, D_OUT), kind.make_config(RunConfig(adapter="randlora", rank=RANK)), "query")
    assert not layer.transposed
    randomize_trainables(layer, seed=3)
    probe = Probe(layer)
    reference = copy.deepcopy(probe)
    x, y = torch.randn(6, TOKENS, 8, generator=torch.Generator().manual_seed(1)), torch.arange(6) % CLASSES
    wrapped = GradSampleModule(probe, batch_first=True, loss_reduction="sum", force_functorch=False)
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    factors = [reference.layer.randlora_lambda.weight, reference.layer.randlora_gamma.weight]
    samples = [layer.randlora_lambda.weight.grad_sample, layer.randlora_gamma.weight.grad_sample]
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]), factors)
        for sample, grad in zip(samples, grads):
            torch.testing.assert_close(sample[i], grad, atol=1e-5, rtol=1e-4)
    wrapped._close()
