"""Update rules LoRA-Pro, FRUGAL and GaLore's DCT projection (common/training/): closed forms on tiny float64
matrices against numpy, and one DP step through Opacus against the rule applied by hand to the hand-computed
clipped and noised gradient (the helpers of tests/test_training_pieces.py).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

from common.config import RunConfig
from common.errors import ConfigError
from common.training import optimizer_factory, step_pieces
from common.training.dct import dct_matrix, dct_projector
from common.training.frugal import FrugalAdam, frugal_rank, frugal_split
from common.training.galore import GaLoreAdam
from common.training.lora_pro import LoRAProCorrection, equivalent_gradient, lora_pro_gradients
from tests.test_training_pieces import Tiny, assert_same_parameters, one_dp_step, private_gradient, trainable

M, N, R, S = 6, 5, 2, 1.7  # W is M x N, LoRA rank R, scale s


def lora_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    a, b, g = rng.normal(size=(R, N)), rng.normal(size=(M, R)), rng.normal(size=(M, N))
    return a, b, g


def corrected(a, b, grad_a, grad_b, s=S):
    t = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
    new_a, new_b = lora_pro_gradients(t(a), t(b), t(grad_a), t(grad_b), s)
    return (None if new_a is None else new_a.numpy()), (None if new_b is None else new_b.numpy())


def least_squares(columns: list[np.ndarray], target: np.ndarray) -> np.ndarray:
    """The coefficients minimizing ‖Σ_k c_k columns[k] − target‖_F (numpy's lstsq, minimum norm)."""
    matrix = np.stack([c.ravel() for c in columns], axis=1)
    return np.linalg.lstsq(matrix, target.ravel(), rcond=None)[0]


def unit(shape, index) -> np.ndarray:
    e = np.zeros(shape)
    e[index] = 1.0
    return e


def test_lora_pro_equivalent_gradient_is_the_least_squares_best_approximation_of_the_full_gradient():
    a, b, g = lora_problem()
    grad_a, grad_b = S * b.T @ g, S * g @ a.T  # LoRA's gradients of the full-weight gradient g
    new_a, new_b = corrected(a, b, grad_a, grad_b)
    ours = equivalent_gradient(*(torch.from_numpy(x) for x in (a, b, new_a, new_b)), S).numpy()

    p_b = b @ np.linalg.inv(b.T @ b) @ b.T
    p_a = a.T @ np.linalg.inv(a @ a.T) @ a
    np.testing.assert_allclose(ours, p_b @ g + g @ p_a - p_b @ g @ p_a, atol=1e-10)  # the card's closed form
    # min over (X1, X2) of ‖s (B X1 + X2 A) − g‖ by numpy: its image is the unique best approximation
    basis = ([S * b @ unit((R, N), i) for i in np.ndindex(R, N)]
             + [S * unit((M, R), i) @ a for i in np.ndindex(M, R)])
    best = sum(c * column for c, column in zip(least_squares(basis, g), basis))
    np.testing.assert_allclose(ours, best, atol=1e-10)
    assert np.linalg.norm(ours - g) < np.linalg.norm(S * (b @ grad_a + grad_b @ a) - g)  # better than plain LoRA


def test_lora_pro_x_keeps_the_corrected_gradients_closest_to_the_noised_ones_without_changing_the_step():
    a, b, _ = lora_problem(1)
    rng = np.random.default_rng(7)
    grad_a, grad_b = rng.normal(size=(R, N)), rng.normal(size=(M, R))  # noised: no g has them as its LoRA gradients
    new_a, new_b = corrected(a, b, grad_a, grad_b)

    k_a = np.linalg.inv(b.T @ b) @ grad_a / S**2
    k_b = (np.eye(M) - b @ np.linalg.inv(b.T @ b) @ b.T) @ grad_b @ np.linalg.inv(a @ a.T) / S**2
    np.testing.assert_allclose(S * (b @ new_a + new_b @ a), S * (b @ k_a + k_b @ a), atol=1e-10)  # X changes nothing
    # over every X, (K_A + X A, K_B − B X) closest to (g_A, g_B): least squares in X by numpy
    basis = [np.concatenate([(unit((R, R), i) @ a).ravel(), (-b @ unit((R, R), i)).ravel()]) for i in np.ndindex(R, R)]
    target = np.concatenate([(grad_a - k_a).ravel(), (grad_b - k_b).ravel()])
    x = least_squares(basis, target).reshape(R, R)
    np.testing.assert_allclose(new_a, k_a + x @ a, atol=1e-9)
    np.testing.assert_allclose(new_b, k_b - b @ x, atol=1e-9)


def test_lora_pro_at_lora_init_and_with_a_frozen_factor():
    a, b, _ = lora_problem(2)
    rng = np.random.default_rng(3)
    grad_a, grad_b = rng.normal(size=(R, N)), rng.normal(size=(M, R))
    zero = np.zeros_like(b)  # B = 0: BᵀB = 0, P_B = 0; no division by the damping
    new_a, new_b = corrected(a, zero, grad_a, grad_b)
    p_a = a.T @ np.linalg.inv(a @ a.T) @ a
    np.testing.assert_allclose(new_a, grad_a @ p_a, atol=1e-10)
    np.testing.assert_allclose(new_b, grad_b @ np.linalg.inv(a @ a.T) / S**2, atol=1e-10)

    frozen_a, only_b = corrected(a, b, None, grad_b)  # FFA-LoRA, FedSVD: min ‖s g_B' A − g‖ over g_B' alone
    assert frozen_a is None
    np.testing.assert_allclose(only_b, grad_b @ np.linalg.inv(a @ a.T) / S**2, atol=1e-10)
    only_a, frozen_b = corrected(a, b, grad_a, None)
    assert frozen_b is None
    np.testing.assert_allclose(only_a, np.linalg.inv(b.T @ b) @ grad_a / S**2, atol=1e-10)


def test_lora_pro_dp_step_is_adam_on_the_corrected_private_gradient():
    config = RunConfig(update_rule="lora_pro")
    model = Tiny()
    reference = copy.deepcopy(model)
    pieces = step_pieces(config, model, server_round=1)
    assert [type(p) for p in pieces] == [LoRAProCorrection]
    one_dp_step(model, make_optimizer=optimizer_factory(config), pieces=pieces, lr=0.1)

    named = trainable(reference)
    grads = dict(zip([n for n, _ in named], private_gradient(reference)))
    layer = reference.proj
    new_a, new_b = lora_pro_gradients(layer.lora_A.weight.detach(), layer.lora_B.weight.detach(),
                                      grads["proj.lora_A.weight"], grads["proj.lora_B.weight"], layer.scaling)
    assert not torch.allclose(new_a.float(), grads["proj.lora_A.weight"])  # the correction did something
    grads["proj.lora_A.weight"], grads["proj.lora_B.weight"] = new_a.float(), new_b.float()
    for name, p in named:
        p.grad = grads[name]
    torch.optim.Adam([p for _, p in named], lr=0.1).step()
    assert_same_parameters(model, reference)


def test_frugal_at_full_density_is_torch_adam_and_at_zero_density_is_sign_sgd():
    torch.manual_seed(0)
    w, bias = torch.randn(5, 7), torch.randn(7)
    ours = [nn.Parameter(w.clone()), nn.Parameter(bias.clone())]
    theirs = [nn.Parameter(w.clone()), nn.Parameter(bias.clone())]
    sign = nn.Parameter(w.clone())
    frugal = FrugalAdam(ours, lr=0.1, density=1.0, period=2, sign_lr_scale=0.5)
    adam = torch.optim.Adam(theirs, lr=0.1)
    sign_sgd = FrugalAdam([sign], lr=0.1, density=0.0, period=2, sign_lr_scale=0.5)
    for _ in range(4):
        g, gb = torch.randn(5, 7), torch.randn(7)
        for params, grads in ((ours, (g, gb)), (theirs, (g, gb))):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
        before = sign.detach().clone()
        sign.grad = g.clone()
        frugal.step(), adam.step(), sign_sgd.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sign.detach(), before - 0.1 * 0.5 * g.sign())
        assert not sign_sgd.state[sign]  # state-free


@pytest.mark.parametrize("shape,projection", [((6, 9), "svd"), ((9, 6), "svd"), ((6, 9), "dct")],
                         ids=["left-svd", "right-svd", "left-dct"])
def test_frugal_split_is_exact_and_its_first_step_is_projected_adam_plus_sign_of_the_residual(shape, projection):
    torch.manual_seed(1)
    lr, scale, density = 0.1, 0.3, 0.34
    rank = frugal_rank(torch.Size(shape), density)
    assert rank == 2
    p = nn.Parameter(torch.randn(*shape))
    g = torch.randn(*shape)
    optimizer = FrugalAdam([p], lr=lr, density=density, period=10, sign_lr_scale=scale, projection=projection)
    before = p.detach().clone()
    p.grad = g
    optimizer.step()
    projector, side = optimizer.state[p]["projector"], optimizer.state[p]["side"]
    low, residual = frugal_split(g, projector, side)
    back = projector @ low if side == "left" else low @ projector.T
    torch.testing.assert_close(back + residual, g)  # projected + residual = the gradient
    orthogonal = projector.T @ residual if side == "left" else residual @ projector
    assert float(orthogonal.abs().max()) < 1e-5
    direction = low / (low.abs() + 1e-8)  # Adam's first step
    adam_part = projector @ direction if side == "left" else direction @ projector.T
    torch.testing.assert_close(p.detach() - before, -lr * adam_part - lr * scale * residual.sign(), atol=1e-5, rtol=1e-4)


def test_frugal_resets_its_moments_when_the_subspace_is_refreshed():
    torch.manual_seed(2)
    p = nn.Parameter(torch.randn(6, 9))
    optimizer = FrugalAdam([p], lr=0.1, density=0.34, period=2, sign_lr_scale=0.1)
    steps = []
    for _ in range(3):
        p.grad = torch.randn(6, 9)
        optimizer.step()
        steps.append(optimizer.state[p]["step"])
    assert steps == [1, 2, 1]


@pytest.mark.parametrize("m", [1, 5, 8])
def test_dct_matrix_is_orthonormal_and_is_the_dct_ii(m):
    q = dct_matrix(m)
    torch.testing.assert_close(q.T @ q, torch.eye(m, dtype=torch.float64), atol=1e-12, rtol=0)
    x = np.random.default_rng(m).normal(size=m)
    np.testing.assert_allclose(q.T.numpy() @ x, scipy.fft.dct(x, type=2, norm="ortho"), atol=1e-12)


def test_dct_projector_keeps_the_best_subset_of_basis_columns():
    torch.manual_seed(3)
    g = torch.randn(5, 8, dtype=torch.float64)
    projector, side = dct_projector(g, 2)
    assert side == "left" and projector.shape == (5, 2)
    q = dct_matrix(5)
    best = max(itertools.combinations(range(5), 2), key=lambda i: float(torch.linalg.norm(q[:, list(i)].T @ g)))
    torch.testing.assert_close(projector, q[:, list(best)])
    in_span = q[:, [1, 3]] @ torch.randn(2, 8, dtype=torch.float64)  # columns in the span of two DCT columns
    p, _ = dct_projector(in_span, 2)
    assert float(torch.linalg.norm(in_span - p @ p.T @ in_span)) < 1e-10
    full, _ = dct_projector(g, 5)  # at full rank the basis is complete: the projection loses nothing
    torch.testing.assert_close(full @ full.T @ g, g)


def test_galore_with_dct_at_full_rank_is_torch_adam_and_below_it_stays_in_the_span():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    ours, theirs = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    galore = GaLoreAdam([ours], lr=0.1, rank=5, period=2, scale=0.25, projection="dct")
    adam = torch.optim.Adam([theirs], lr=0.1)
    for _ in range(3):
        g = torch.randn(5, 7)
        ours.grad, theirs.grad = g.clone(), g.clone()
        galore.step(), adam.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-5)
    low_rank = nn.Parameter(w.clone())
    optimizer = GaLoreAdam([low_rank], lr=0.1, rank=2, period=2, scale=0.25, projection="dct")
    low_rank.grad = torch.randn(5, 7)
    optimizer.step()
    projector = optimizer.state[low_rank]["projector"]
    delta = low_rank.detach() - w
    assert float(((torch.eye(5) - projector @ projector.T) @ delta).abs().max()) < 1e-5


@pytest.mark.parametrize("overrides", [{"update-rule": "frugal"}, {"update-rule": "frugal", "galore-projection": "dct"},
                                       {"update-rule": "galore", "galore-projection": "dct", "galore-rank": 1}],
                         ids=["frugal-svd", "frugal-dct", "galore-dct"])
def test_projected_rules_act_on_the_hand_computed_clipped_and_noised_gradient(overrides):
    config = RunConfig.from_flower(overrides)
    model = Tiny()
    reference = copy.deepcopy(model)
    one_dp_step(model, make_optimizer=optimizer_factory(config), lr=0.1)
    named = trainable(reference)
    for (_, p), g in zip(named, private_gradient(reference)):
        p.grad = g
    optimizer_factory(config)(named, 0.1).step()
    assert_same_parameters(model, reference)


@pytest.mark.parametrize("overrides,fragment", [
    ({"update-rule": "lora_pro", "adapter": "nola"},
     "update-rule = 'lora_pro' corrects the gradients of plain LoRA pairs.*adapter 'nola' trains nola_A, nola_B: use "
     "adapter 'lora' or 'diffora'"),
    ({"update-rule": "lora_pro", "adapter": "sora"}, "adapter 'sora' trains lora_A, lora_B, sora_gate"),
    ({"update-rule": "lora_pro", "rank-schedule": "dylora"},
     "update-rule = 'lora_pro' cannot be combined with rank-schedule = 'dylora'"),
    ({"galore-projection": "dct"}, "galore-projection = 'dct' picks the projector of update-rule frugal or galore"),
    ({"update-rule": "galore", "galore-projection": "fft"}, "galore-projection = 'fft' is invalid: choose dct or svd"),
    ({"frugal-density": 1.5}, "frugal-density = 1.5 is invalid"),
    ({"frugal-period": 0}, "frugal-period = 0 is invalid"),
    ({"update-rule": "lion"}, "unknown update-rule 'lion'; available: adam, frugal, galore, lora_pro, sgd"),
])
def test_incompatible_update_rules_fail_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flower(overrides)


def test_valid_update_rule_combinations_parse():
    for overrides in ({"update-rule": "lora_pro"}, {"update-rule": "lora_pro", "adapter": "diffora"},
                      {"update-rule": "lora_pro", "strategy": "ffa_lora"}, {"update-rule": "frugal", "adapter": "nola"},
                      {"update-rule": "galore", "galore-projection": "dct"}):
        RunConfig.from_flower(overrides)


def _lora_and_head(width: int, rank: int, classes: int) -> nn.Module:
    """One LoRA layer and a classifier head: what `head_parameters` must tell apart."""
    from common.adapters.lora import LoRAConfig, LoRALinear

    model = nn.Module()
    model.layer = LoRALinear(nn.Linear(width, width), LoRAConfig(rank=rank), "layer")
    model.classifier = nn.Linear(width, classes)
    return model

def test_head_lr_steps_the_classifier_head_at_its_own_learning_rate():
    """SGD with lr 0.1 and head-lr 0.5: the adapter factors move by 0.1 g, the head by 0.5 g; head-lr 0 is lr."""
    from common.training import head_parameters, optimizer_factory

    torch.manual_seed(0)
    model = _lora_and_head(width=4, rank=2, classes=2)
    head = head_parameters(model)
    assert head == {"classifier.weight", "classifier.bias"}
    for head_lr, expected_head_lr in ((0.5, 0.5), (0.0, 0.1)):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in named}
        grads = {n: torch.randn_like(p) for n, p in named}
        for n, p in named:
            p.grad = grads[n].clone()
        config = RunConfig(update_rule="sgd", head_lr=head_lr)
        optimizer_factory(config, head)(named, 0.1).step()
        for n, p in named:
            rate = expected_head_lr if n in head else 0.1
            torch.testing.assert_close(p.detach(), before[n] - rate * grads[n])


def test_the_head_of_a_real_model_excludes_adapters_and_trained_embeddings():
    from common.model import build_model
    from common.training import head_parameters

    model = build_model(RunConfig(train_embeddings=True), num_labels=3).model
    assert head_parameters(model) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("rule", ["galore", "frugal"])
def test_projected_rules_step_the_classifier_head_with_plain_adam(rule):
    """GaLore and FRUGAL project the adapter matrices only (as the reference code does): a 6 x 8 head, which
    rank 2 would project, takes exactly torch's Adam step."""
    from common.training import head_parameters, optimizer_factory

    torch.manual_seed(1)
    model = _lora_and_head(width=8, rank=4, classes=6)
    reference = copy.deepcopy(model.classifier)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: torch.randn_like(p) for n, p in named}
    for n, p in named:
        p.grad = grads[n].clone()
    config = RunConfig(update_rule=rule, galore_rank=2, frugal_density=0.25)
    optimizer_factory(config, head_parameters(model))(named, 0.01).step()
    for p, n in ((reference.weight, "classifier.weight"), (reference.bias, "classifier.bias")):
        p.grad = grads[n].clone()
    torch.optim.Adam(reference.parameters(), lr=0.01).step()
    torch.testing.assert_close(model.classifier.weight, reference.weight)
    torch.testing.assert_close(model.classifier.bias, reference.bias)
