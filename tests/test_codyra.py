"""CoDyRA (card 5): LoRA with rank-importance weights w, ΔW = B diag(w) A, pruned by a scheduled soft-threshold
after each private update (post-processing); ranks whose w reached 0 drop out.

The schedule is checked against the reference code's training loop (Artificer-AI-Lab/CoDyRA,
`models/codyra.py`: threshold index bumps and the prune condition), the prox against soft-thresholding of
the SGD step on the hand-computed clipped and noised gradient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.adapters import get_adapter
from common.adapters.codyra import CoDyRALinear, pruned_codyra
from common.config import RunConfig
from common.errors import ConfigError
from common.training import step_pieces
from common.training.codyra import CoDyRAProx, codyra_threshold
from common.training.prox import soft_threshold
from server.strategies import check_compatible
from tests.test_dp_step import SEQ, WIDTH
from tests.test_training_pieces import Tiny, one_dp_step, private_gradient, trainable


def reference_thresholds(total: int, kappa: float, levels: int, dense: float) -> list[float]:
    """The reference loop: the threshold applied after each iteration (0 where it does not prune)."""
    lambdas = np.linspace(0, kappa, levels)
    dense_iters = dense * total
    step_iters = int((total - dense_iters) // levels)
    threshold_id, threshold, out = 0, lambdas[0], []
    for iteration in range(total):
        if step_iters > 0 and iteration >= dense_iters and iteration % step_iters == 0:
            threshold_id += 1
            threshold = lambdas[min(len(lambdas) - 1, threshold_id)]
        out.append(float(threshold) if iteration > dense_iters else 0.0)
    return out


@pytest.mark.parametrize("total,levels,dense", [(1000, 50, 0.5), (1000, 7, 0.3), (130, 4, 0.25), (60, 3, 0.0),
                                                (40, 40, 0.0)])
def test_threshold_schedule_is_the_reference_loops(total, levels, dense):
    ours = [codyra_threshold(t, total, 7e-4, levels, dense) for t in range(total)]
    np.testing.assert_allclose(ours, reference_thresholds(total, 7e-4, levels, dense), rtol=1e-12, atol=0)
    assert max(ours) == pytest.approx(7e-4) or levels > total  # the staircase reaches κ


def test_a_short_federated_run_still_prunes_where_the_reference_would_not():
    """T = 30 steps, J = 50 levels: the reference's step ⌊15/50⌋ = 0 never raises τ; ours climbs one level a step."""
    assert set(reference_thresholds(30, 7e-4, 50, 0.5)) == {0.0}
    ours = [codyra_threshold(t, 30, 7e-4, 50, 0.5) for t in range(30)]
    assert ours[:16] == [0.0] * 16 and ours[16] == pytest.approx(7e-4 * 2 / 49)
    assert ours[29] == pytest.approx(7e-4 * 15 / 49) and ours == sorted(ours)


def test_the_prox_is_soft_thresholding_of_the_sgd_step_on_the_private_gradient():
    """Round 2 of 2, one step a round, no dense phase: step t = 1 prunes at τ = κ (levels 2: 0, κ)."""
    lr, kappa = 0.5, 0.3
    config = RunConfig(adapter="codyra", strategy="fedavg_lora", lr=lr, codyra_kappa=kappa, codyra_levels=2,
                       codyra_dense=0.0, num_rounds=2, local_steps=1)
    model = Tiny(CoDyRALinear)
    with torch.no_grad():
        model.proj.codyra_gate.weight.copy_(torch.tensor([1.0, 0.05, -0.4, 0.12]))
    reference = copy.deepcopy(model)
    pieces = step_pieces(config, model, server_round=2)
    assert [type(p) for p in pieces] == [CoDyRAProx]
    one_dp_step(model, optimizer_name="sgd", lr=lr, pieces=pieces)

    grads = dict(zip([n for n, _ in trainable(reference)], private_gradient(reference)))
    gate = reference.proj.codyra_gate.weight.detach()
    expected = soft_threshold(gate - lr * grads["proj.codyra_gate.weight"], kappa)
    torch.testing.assert_close(model.proj.codyra_gate.weight.detach(), expected, atol=1e-6, rtol=1e-5)
    assert (expected == 0).any(), "the threshold must zero at least one weight for this test to mean something"
    assert step_pieces(RunConfig(adapter="codyra", strategy="fedavg_lora", codyra_kappa=0.0), Tiny(CoDyRALinear),
                       server_round=1) == []


def test_a_fresh_layer_is_w0_at_scale_one_with_seeded_random_weights():
    kind = get_adapter("codyra")
    config = kind.make_config(RunConfig(adapter="codyra", rank=4, alpha=16.0))
    assert config.scaling == 1.0
    base = torch.nn.Linear(WIDTH, WIDTH)
    layer, again = CoDyRALinear(base, config, "proj"), CoDyRALinear(base, config, "proj")
    other = CoDyRALinear(base, config, "other")
    torch.testing.assert_close(layer.codyra_gate.weight, again.codyra_gate.weight, atol=0, rtol=0)
    assert not torch.equal(layer.codyra_gate.weight, other.codyra_gate.weight)
    x = torch.randn(2, SEQ, WIDTH)
    torch.testing.assert_close(layer(x), base(x))  # B = 0


def test_ranks_with_zero_weight_drop_out_and_merging_keeps_the_output():
    layer = Tiny(CoDyRALinear).proj
    with torch.no_grad():
        layer.codyra_gate.weight.copy_(torch.tensor([0.0, 1.5, 0.0, -0.7]))
    x = torch.randn(2, SEQ, WIDTH)
    before = layer(x)
    a, b = pruned_codyra(layer)
    assert a.shape == (2, WIDTH) and b.shape == (WIDTH, 2)
    torch.testing.assert_close(layer.base(x) + layer.scaling * x @ a.T @ b.T, before)
    layer.merge()  # CoDyRA's end of a task: W0 <- W0 + ΔW, and the model without the adapter gives the same output
    torch.testing.assert_close(layer.base(x), before, atol=1e-5, rtol=1e-5)


def test_codyra_is_refused_by_strategies_that_refactor_ranks():
    with pytest.raises(ConfigError, match="strategy 'fedsvd' re-factors B A into new ranks each round, but each "
                                          "rank of adapter 'codyra' has its own importance weight"):
        check_compatible("fedsvd", "codyra")
    check_compatible("fedavg_lora", "codyra")
    check_compatible("ffa_lora", "codyra")


@pytest.mark.parametrize("overrides,fragment", [
    ({"codyra-levels": 1}, "codyra-levels = 1 is invalid"),
    ({"codyra-dense": 1.0}, "codyra-dense = 1.0 is invalid"),
    ({"codyra-kappa": -1e-3}, "codyra-kappa = -0.001 is invalid"),
    ({"adapter": "codyra", "rank-schedule": "dylora"}, "rank-schedule = 'dylora' truncates the rank dimension"),
])
def test_bad_codyra_settings_fail_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flower(overrides)
