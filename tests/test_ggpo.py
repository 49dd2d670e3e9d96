"""LoRA-GGPO's perturbation (common/training/ggpo.py): the card's std formula, ρ = 0 is LoRA exactly, nothing is
stored in the model, and a DP step is the textbook DP-SGD step at the perturbed point, with the perturbation
scaled by the previous step's privatized gradient only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from common.config import RunConfig
from common.errors import ConfigError
from common.training import step_pieces
from common.training.ggpo import GGPOPerturbation, perturbation, row_std
from tests.test_training_pieces import Tiny, assert_same_parameters, one_dp_step, private_gradient, trainable

RHO = 0.3


def test_perturbation_rows_have_the_cards_std():
    grad_rows, weight_rows, d_in = torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1.0, 3.0, 0.5]), 4096
    std = row_std(grad_rows, weight_rows, d_in, rho=0.5, grad_weight=0.25, weight_weight=0.75)
    torch.testing.assert_close(std, 0.5 * (0.25 * grad_rows + 0.75 * weight_rows) / 64.0)
    eps = perturbation(std, d_in, torch.Generator().manual_seed(0))
    assert eps.shape == (3, d_in)
    assert torch.allclose(eps.std(dim=1), std, rtol=0.05)


def test_ggpo_at_rho_zero_is_lora_exactly_and_leaves_nothing_in_the_model():
    model, plain = Tiny(), Tiny()
    piece = GGPOPerturbation(model, 0.0, 0.5, 0.5, seed=42, server_round=1)
    one_dp_step(model, optimizer_name="adam", lr=0.1, pieces=[piece])
    one_dp_step(plain, optimizer_name="adam", lr=0.1)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    assert set(model.state_dict()) == set(plain.state_dict())  # no ε in the model
    assert not model.proj._forward_hooks  # train_locally closed the piece


def test_ggpo_dp_step_is_the_dp_sgd_step_at_the_perturbed_point_and_scales_by_the_private_gradient():
    model = Tiny()
    reference, initial, unperturbed = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    pieces = step_pieces(RunConfig(ggpo_rho=RHO), model, server_round=1)
    assert [type(p) for p in pieces] == [GGPOPerturbation]
    one_dp_step(model, optimizer_name="sgd", pieces=pieces)

    twin = GGPOPerturbation(reference, RHO, 0.5, 0.5, seed=42, server_round=1)  # the same ε
    twin.before_forward(0)
    grads = private_gradient(reference)  # per-example gradients at W + ε, clipped, noised
    twin.close()
    named = trainable(reference)
    with torch.no_grad():
        for (_, p), g in zip(named, grads):
            p -= g
    assert_same_parameters(model, reference)
    one_dp_step(unperturbed, optimizer_name="sgd")
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), unperturbed.parameters()))
    assert moved > 1e-6  # the same step without ε lands elsewhere: ε mattered

    by_name = dict(zip([n for n, _ in named], grads))  # the next step's G: the private equivalent gradient
    layer = initial.proj
    direction = layer.scaling * (layer.lora_B.weight.detach() @ by_name["proj.lora_A.weight"]
                                 + by_name["proj.lora_B.weight"] @ layer.lora_A.weight.detach())
    torch.testing.assert_close(pieces[0].grad_rows[0], direction.norm(dim=1), atol=1e-6, rtol=1e-5)


def test_ggpo_needs_plain_lora_pairs():
    with pytest.raises(ConfigError, match="ggpo-rho = 0.1 perturbs W0 \\+ s B A of plain LoRA layers, and adapter "
                                          "'nola' has other factors: use adapter 'lora' or 'diffora'"):
        RunConfig.from_flower({"ggpo-rho": 0.1, "adapter": "nola"})
    with pytest.raises(ConfigError, match="ggpo-rho = -1.0 is invalid"):
        RunConfig.from_flower({"ggpo-rho": -1.0})
    RunConfig.from_flower({"ggpo-rho": 0.1, "update-rule": "lora_pro"})
