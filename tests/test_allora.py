"""ALLoRA (card 12): a scale-free, dropout-free LoRA whose rows move by c = 1/sqrt(‖row‖² + 1/η²) times the
update rule's step, applied to the privatized gradient's update (post-processing).

The DP tests drive `train_locally` through Opacus and compare with the rule applied by hand to the
hand-computed clipped and noised gradient (tests/test_training_pieces.py's helpers), then scaled row by row.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from common.adapters import get_adapter
from common.adapters.allora import ALLoRALinear
from common.config import RunConfig
from common.errors import ConfigError
from common.training import optimizer_factory, step_pieces
from common.training.allora import ALLoRAStep, allora_coefficient
from tests.test_training_pieces import Tiny, assert_same_parameters, one_dp_step, private_gradient, trainable


def test_coefficient_is_eta_at_zero_and_about_one_over_the_norm_for_large_rows():
    rows = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3000.0, 4000.0]])
    c = allora_coefficient(rows, eta=2.0).squeeze(1)
    assert c[0] == pytest.approx(2.0)  # θ = 0: the step is η times the rule's
    assert c[1] == pytest.approx(1 / math.sqrt(25 + 0.25))
    assert c[2] == pytest.approx(1 / 5000, rel=1e-7)  # ‖θ‖ ≫ 1/η: about 1/‖θ‖


def test_the_layer_is_lora_at_scale_one_without_dropout():
    kind = get_adapter("allora")
    config = kind.make_config(RunConfig(adapter="allora", rank=4, alpha=16.0))
    assert config.scaling == 1.0 and config.dropout == 0.0
    with pytest.raises(ConfigError, match="lora-dropout = 0.1 with adapter 'allora': ALLoRA trains without dropout"):
        RunConfig.from_flower({"adapter": "allora", "lora-dropout": 0.1})


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_a_dp_step_moves_each_row_by_c_times_the_rules_step_on_the_private_gradient(rule):
    eta, lr = 0.8, 0.1
    config = RunConfig(adapter="allora", allora_eta=eta, update_rule=rule)
    model = Tiny(ALLoRALinear)
    with torch.no_grad():
        model.proj.lora_B.weight[1:3] = 0.0  # rows at 0: they move at η times the rule's step
    reference = copy.deepcopy(model)
    pieces = step_pieces(config, model, server_round=1)
    assert [type(p) for p in pieces] == [ALLoRAStep]
    one_dp_step(model, make_optimizer=optimizer_factory(config), lr=lr, pieces=pieces)

    named = trainable(reference)
    before = {name: p.detach().clone() for name, p in named}
    for (_, p), g in zip(named, private_gradient(reference)):
        p.grad = g
    optimizer_factory(config)(named, lr).step()  # the rule's own step on the hand-computed private gradient
    with torch.no_grad():
        for name, p in named:
            if ".lora_" in name:
                p.copy_(before[name] + allora_coefficient(before[name], eta) * (p - before[name]))
    assert_same_parameters(model, reference)
    moved = model.proj.lora_B.weight.detach()[1:3] - before["proj.lora_B.weight"][1:3]
    assert moved.abs().max() > 0, "the zero rows of B must have moved for this test to mean something"


def test_no_allora_piece_without_allora_layers():
    assert step_pieces(RunConfig(allora_eta=0.5), Tiny(), server_round=1) == []
