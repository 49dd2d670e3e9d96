"""LoKU (client/loku.py): the closed forms, and that it lowers the forgotten data's membership score.

The end-to-end check trains a tiny BERT (1 layer, hidden 16) to memorize random labels, so the loss-threshold
attack tells members from unseen data, then runs LoKU on the members: seconds on a CPU.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.dp_training import DPSettings, train_locally
from client.loku import (calibrate_loku_noise, importance, inverted_hinge_loss, loku_init, loku_unlearn,
                         project_update, row_fisher, travelling_update, weighted_low_rank)
from common.adapters.inject import inject_adapters
from common.config import RunConfig
from common.evaluation import evaluate, per_example_losses
from common.privacy import PrivacyLedger, PrivacyStep
from common.privacy.membership import membership_auc

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and much faster on a loaded machine (no spinning threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_model(seed: int = 0, labels: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    inject_adapters(model, RunConfig(rank=2, alpha=4.0, seed=seed))
    return model


def random_data(n: int, seed: int, labels: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, labels, (n,), generator=g))


def test_inverted_hinge_loss_closed_form():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-50.0, 50.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    p = logits.softmax(-1)
    expected = torch.stack([1 + p[0, 0] - p[0, 1], 1 + p[1, 1] - p[1, 0], 1 + p[2, 0] - p[2, 1]])
    loss = inverted_hinge_loss(logits, labels, reduction="none")
    torch.testing.assert_close(loss, expected)
    assert float(loss[2]) == pytest.approx(0.0, abs=1e-6)  # p(true) = 0, runner-up has p = 1
    many = inverted_hinge_loss(torch.randn(500, 5) * 5, torch.randint(0, 5, (500,)), reduction="none")
    assert float(many.min()) >= 0.0 and float(many.max()) <= 2.0


def test_weighted_low_rank_is_eckart_young_in_the_weighted_norm():
    g = torch.Generator().manual_seed(1)
    w, rows = torch.randn(12, 9, generator=g, dtype=torch.float64), torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    b0, a0 = weighted_low_rank(w, rows, 3)
    d = rows.sqrt()[:, None]
    error = torch.linalg.norm(d * (w - b0 @ a0))
    trailing = torch.linalg.svdvals(d * w)[3:]
    assert float(error) == pytest.approx(float(trailing.norm()), rel=1e-9)
    for _ in range(20):  # no other rank-3 matrix does better in that norm
        other = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
        assert torch.linalg.norm(d * (w - other)) >= error
    b_full, a_full = weighted_low_rank(w, rows, 9)
    torch.testing.assert_close(b_full @ a_full, w)


def test_loku_init_leaves_the_outputs_unchanged():
    model = tiny_model()
    with torch.no_grad():  # a non-zero global LoRA, as after federated training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    data = random_data(6, 3)
    before = model(input_ids=data.tensors[0], attention_mask=data.tensors[1]).logits
    weights = {n: torch.rand(16) + 0.5 for n, m in model.named_modules() if hasattr(m, "lora_A")}
    loku_init(model, weights, 2)
    after = model(input_ids=data.tensors[0], attention_mask=data.tensors[1]).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_row_fisher_matches_one_example_at_a_time():
    model = tiny_model()
    data = random_data(5, 4)
    fisher = row_fisher(model, data, CPU)
    layer_name = "bert.encoder.layer.0.attention.self.query"
    layer = model.get_submodule(layer_name)
    brute = torch.zeros(16, dtype=torch.float64)
    for i in range(5):
        weight = layer.base.weight.detach().clone().requires_grad_(True)
        logits = torch.func.functional_call(model, {f"{layer_name}.base.weight": weight},
                                            kwargs={"input_ids": data.tensors[0][i:i + 1],
                                                    "attention_mask": data.tensors[1][i:i + 1]}).logits
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, data.tensors[2][i:i + 1]), weight)
        brute += (grad.double() ** 2).sum(dim=1)
    torch.testing.assert_close(fisher[layer_name].double(), brute / 5, rtol=1e-4, atol=1e-10)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)  # restored
    w = importance(fisher)
    assert all(float(v.mean()) == pytest.approx(1.0) and float(v.min()) > 0 for v in w.values())


def test_projection_closed_forms():
    rng = np.random.default_rng(0)
    a = np.linalg.qr(rng.normal(size=(9, 3)))[0].T  # orthonormal rows, as FedSVD's A
    b_true = rng.normal(size=(12, 3))
    delta = 2.0 * b_true @ a
    none, b = project_update(delta, 2.0, 3, a)  # in A's row space: recovered exactly
    assert none is None and np.allclose(b, b_true, atol=1e-5)
    low = rng.normal(size=(12, 2)) @ rng.normal(size=(2, 9))
    a2, b2 = project_update(low, 0.5, 2, None)  # rank-2 update, rank-2 factors: exact
    assert np.allclose(0.5 * b2 @ a2, low, atol=1e-5)


def test_loku_noise_fits_the_raised_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path / "client-0.json", "0", 9.0, 1e-5)
    ledger.charge(PrivacyStep(1, 1.0, 0.1, 30))  # the federated rounds
    sigma = calibrate_loku_noise(ledger, 2, 0.1, 10)
    from common.privacy.accounting import epsilon_of
    rows = [*ledger.history, PrivacyStep(2, sigma, 1.0, 1), PrivacyStep(2, sigma, 0.1, 10)]
    assert epsilon_of(rows, 1e-5) <= 9.0 + 1e-6
    assert epsilon_of([*rows[:1], PrivacyStep(2, sigma * 0.98, 1.0, 1), PrivacyStep(2, sigma * 0.98, 0.1, 10)],
                      1e-5) > 9.0  # the smallest such noise (to the search tolerance)


@pytest.fixture(scope="module")
def memorized():
    """A tiny model trained (no DP) to memorize 16 random-label members; 16 unseen examples beside them."""
    model = tiny_model(seed=5)
    members, unseen = random_data(16, 10), random_data(16, 11)
    model.requires_grad_(True)
    train_locally(model, members, steps=60, batch_size=16, lr=0.03, dp=DPSettings(None, 1.0), device=CPU,
                  sampling_generator=torch.Generator().manual_seed(0))
    model.requires_grad_(False)
    return model, members, unseen


def scores(model, members, unseen):
    auc = membership_auc(per_example_losses(model, members, 64, CPU), per_example_losses(model, unseen, 64, CPU))
    return auc, evaluate(model, members, 64, CPU)[1]


@pytest.mark.parametrize("noise", [None, 0.5])
def test_loku_lowers_the_forgotten_datas_membership_score(memorized, noise):
    model, members, unseen = copy.deepcopy(memorized[0]), *memorized[1:]
    auc_before, acc_before = scores(model, members, unseen)
    assert auc_before > 0.9 and acc_before > 0.9  # memorized: the attack works before unlearning
    global_arrays = {n: p.detach().numpy().copy() for n, p in model.named_parameters()
                     if "lora_" in n or n.startswith("classifier")}
    seeds = (torch.Generator().manual_seed(k) for k in (1, 2, 3))
    stats = loku_unlearn(model, members, rank=2, steps=20, lr=0.1, batch_size=8, max_grad_norm=1.0, device=CPU,
                         noise_multiplier=noise, fisher_generator=next(seeds), sampling_generator=next(seeds),
                         noise_generator=next(seeds))
    auc_after, acc_after = scores(model, members, unseen)
    assert stats["steps"] == 20 and stats["train-loss"] < stats["first-loss"]
    assert auc_after < auc_before - 0.2 and acc_after < acc_before - 0.3
    payload, kept = travelling_update(model, stats["originals"], global_arrays, set(global_arrays), False, 2)
    assert set(payload) == set(global_arrays) and all(np.isfinite(v).all() for v in payload.values())
    assert 0.0 <= kept <= 1.0 and not math.isnan(kept)


def test_membership_auc_is_the_brute_force_pair_count():
    rng = np.random.default_rng(0)
    members, others = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)  # with ties
    pairs = [(1.0 if m < o else 0.5 if m == o else 0.0) for m in members for o in others]
    assert membership_auc(members, others) == pytest.approx(np.mean(pairs))
    assert membership_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and membership_auc([1.0], [1.0]) == 0.5
    assert math.isnan(membership_auc([], [1.0]))


def test_lokus_strategy_table_matches_the_strategies_frozen_factors():
    from client.loku import LOKU_FROZEN_FACTORS
    from server.strategies import STRATEGIES

    for name, frozen in LOKU_FROZEN_FACTORS.items():
        assert STRATEGIES[name].frozen_factors == frozen and not STRATEGIES[name].rank_heterogeneous
