"""Intruder dimensions on the card's closed-form cases, and on a real adapter layer."""

from __future__ import annotations

import numpy as np
import torch

from common.intruders import intruder_count, model_intruders


def test_no_fine_tuning_means_no_intruders():
    w0 = np.random.default_rng(0).normal(size=(40, 30))
    assert intruder_count(w0, w0) == 0


def test_a_dominant_direction_outside_the_pretrained_ones_is_exactly_one_intruder():
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.normal(size=(40, 40)))[0]
    w0 = q[:, :8] @ np.diag(np.linspace(5, 1, 8)) @ np.linalg.qr(rng.normal(size=(30, 8)))[0].T  # rank 8
    u = q[:, 20]  # orthogonal to every live left singular vector of W0
    v = rng.normal(size=30)
    v /= np.linalg.norm(v)
    assert intruder_count(w0, w0 + 10.0 * np.outer(u, v), top_k=8) == 1  # c = 10 > sigma_max = 5
    # the same update along W0's top direction is no intruder
    assert intruder_count(w0, w0 + 10.0 * np.outer(q[:, 0], v), top_k=8) == 0
    # a weak new direction (c below every sigma of W0) does not reach the top 8
    assert intruder_count(w0, w0 + 0.1 * np.outer(u, v), top_k=8) == 0


def test_model_intruders_reads_w0_plus_delta_w_of_each_adapter_layer():
    from common.adapters.registry import get_adapter
    from common.config import RunConfig

    torch.manual_seed(0)
    kind = get_adapter("lora")
    layer = kind.wrap(torch.nn.Linear(30, 40), kind.make_config(RunConfig(rank=2)), "query")
    model = torch.nn.ModuleDict({"query": layer})
    assert model_intruders(model) == {"query": 0}  # B = 0 at init: W_ft = W0
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(50.0 * torch.randn_like(p))
    w0 = layer.base.weight.double().numpy()
    expected = intruder_count(w0, w0 + layer.delta_weight().detach().double().numpy())
    assert model_intruders(model) == {"query": expected} and expected >= 1
    layer.merge()  # merged: W0 is recovered from the merged weight
    assert model_intruders(model) == {"query": expected}
