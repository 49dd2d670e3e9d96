"""SaRA (common/adapters/sara.py): its data-free support, its DP step, what it sends, what it refuses.

The shared table (tests/test_adapters.py) runs it through every adapter's checks as well: merge and unmerge,
Opacus per-sample gradients against one example at a time, payload round trip, exact averaging.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from client.dp_training import DPSettings, train_locally
from common.adapters import get_adapter, inject_adapters
from common.adapters.sara import SaRAConfig, SaRALinear
from common.config import RunConfig
from common.errors import ConfigError
from common.payload import from_record, load_state, to_record, trainable_state
from server.strategies import STRATEGIES, check_compatible
from tests.test_dp_step import BATCH, CLASSES, VOCAB, WIDTH, hand_dp_gradient, poisson_batch, toy_data

SIGMA, CLIP, SAMPLING_SEED, NOISE_SEED = 0.7, 0.05, 3, 11


def support_positions(layer: SaRALinear) -> list[int]:
    d_in = layer.base.in_features
    return (layer.sara_delta.rows * d_in + layer.sara_delta.cols).tolist()


def test_support_is_exactly_the_k_smallest_magnitudes_of_w0_and_every_build_finds_the_same():
    torch.manual_seed(0)
    base = nn.Linear(30, 20)
    config = SaRAConfig(density=0.05)
    layer = SaRALinear(base, config, "encoder.layer.0.query")
    w = base.weight.detach().flatten().tolist()
    k = round(0.05 * 20 * 30)
    brute = sorted(sorted(range(600), key=lambda f: (abs(w[f]), f))[:k])
    assert support_positions(layer) == brute
    assert get_adapter("sara").trainable_count(20, 30, config) == k == layer.sara_delta.weight.numel() == 30
    on = torch.tensor(brute)
    off = torch.ones(600, dtype=torch.bool)
    off[on] = False
    magnitudes = base.weight.detach().abs().flatten()
    assert magnitudes[on].max() < magnitudes[off].min()
    elsewhere = SaRALinear(copy.deepcopy(base), config, "another.name")  # another party: W0 alone decides
    assert support_positions(elsewhere) == brute


def test_ties_in_w0_go_to_the_earlier_position():
    base = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, -1.0], [2.0, 0.0, 0.0, 1.0]]))
    assert support_positions(SaRALinear(copy.deepcopy(base), SaRAConfig(density=0.5), "q")) == [0, 2, 5, 6]
    assert support_positions(SaRALinear(copy.deepcopy(base), SaRAConfig(density=0.75), "q")) == [0, 1, 2, 3, 5, 6]


def two_layer_model(density: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("query", nn.Linear(40, 30))
    model.add_module("value", nn.Linear(30, 40))
    inject_adapters(model, RunConfig(adapter="sara", rank=2, sara_density=density, target_modules="query,value"))
    return model


def test_each_layer_gets_its_own_k_smallest_and_the_payload_is_their_values_only():
    model = two_layer_model(density=0.1)
    payload = trainable_state(model)
    assert set(payload) == {"query.sara_delta.weight", "value.sara_delta.weight"}
    for name in ("query", "value"):
        layer = model.get_submodule(name)
        w = layer.base.weight.detach().flatten().tolist()
        assert support_positions(layer) == sorted(sorted(range(1200), key=lambda f: (abs(w[f]), f))[:120])
        assert payload[f"{name}.sara_delta.weight"].shape == (120,)
    dense_bytes = sum(model.get_submodule(n).base.weight.numel() * 4 for n in ("query", "value"))
    sent = from_record(to_record(payload))
    assert sum(v.nbytes for v in sent.values()) == 2 * 120 * 4 == dense_bytes // 10
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in (model.query, model.value):
            layer.sara_delta.weight.copy_(torch.randn(120, generator=generator))
    receiver = two_layer_model(density=0.1)  # a party that gets only the values rebuilds the same ΔW
    load_state(receiver, from_record(to_record(trainable_state(model))))
    for name in ("query", "value"):
        torch.testing.assert_close(receiver.get_submodule(name).delta_weight(), model.get_submodule(name).delta_weight(),
                                   atol=0, rtol=0)


class Tiny(nn.Module):
    """Frozen embedding -> SaRA layer -> mean pool -> head, called like HF (tests/test_dp_step.py's data)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH).requires_grad_(False)
        self.proj = SaRALinear(nn.Linear(WIDTH, WIDTH), SaRAConfig(density=0.25), "proj")
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, input_ids, attention_mask):
        hidden = self.proj(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(logits=self.head((hidden * mask).sum(1) / mask.sum(1)))


def test_a_dp_step_is_the_hand_computed_clipped_and_noised_step_on_the_support_and_nothing_else():
    model = Tiny()
    reference = copy.deepcopy(model)
    w0 = model.proj.base.weight.detach().clone()
    train_locally(model, toy_data(), steps=1, batch_size=BATCH, lr=1.0, optimizer_name="sgd",
                  dp=DPSettings(noise_multiplier=SIGMA, max_grad_norm=CLIP), device=torch.device("cpu"),
                  sampling_generator=torch.Generator().manual_seed(SAMPLING_SEED),
                  noise_generator=torch.Generator().manual_seed(NOISE_SEED))
    expected = hand_dp_gradient(reference, toy_data(), poisson_batch(SAMPLING_SEED), SIGMA, CLIP, NOISE_SEED,
                                expected_batch=BATCH)
    after = dict(model.named_parameters())
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    assert [n for n, _ in named] == ["proj.sara_delta.weight", "head.weight", "head.bias"]
    for (name, before), grad in zip(named, expected):
        torch.testing.assert_close(after[name].detach(), before.detach() - grad, atol=1e-6, rtol=1e-5, msg=name)
    delta = model.proj.delta_weight().detach()
    on = torch.zeros(WIDTH, WIDTH, dtype=torch.bool)
    on[reference.proj.sara_delta.rows, reference.proj.sara_delta.cols] = True
    assert (delta[~on] == 0).all() and (delta[on] != 0).all()
    torch.testing.assert_close(delta[reference.proj.sara_delta.rows, reference.proj.sara_delta.cols], -expected[0],
                               atol=1e-6, rtol=1e-5)
    assert torch.equal(model.proj.base.weight, w0), "W0 stays frozen"


def test_only_fedavg_lora_aggregates_sara_and_the_others_say_so():
    check_compatible("fedavg_lora", "sara")
    for strategy in sorted(set(STRATEGIES) - {"fedavg_lora"}):
        with pytest.raises(ConfigError, match=f"strategy '{strategy}' .*(use strategy 'fedavg_lora'|use adapter 'lora')"):
            check_compatible(strategy, "sara")


@pytest.mark.parametrize("overrides, fragment", [
    ({"sara-density": 0.0}, "sara-density = 0.0 is invalid"),
    ({"sara-density": 1.5}, "sara-density = 1.5 is invalid"),
    ({"update-rule": "galore"}, "update-rule = 'galore' projects matrix gradients, and adapter 'sara'"),
    ({"update-rule": "frugal"}, "update-rule = 'frugal' projects matrix gradients"),
    ({"update-rule": "lora_pro"}, "update-rule = 'lora_pro' corrects the gradients of plain LoRA pairs"),
    ({"rank-schedule": "dylora"}, "rank-schedule = 'dylora' truncates the rank dimension"),
])
def test_settings_sara_cannot_follow_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flower({"adapter": "sara", "strategy": "fedavg_lora", **overrides})


def test_bases_whose_recovery_is_defined_for_lora_refuse_sara():
    from common.bases.registry import check_base

    for base in ("lq_lora", "loram", "qloram"):
        with pytest.raises(ConfigError, match=f"base = '{base}' needs adapter = 'lora'"):
            check_base(RunConfig(adapter="sara", base=base))
    check_base(RunConfig(adapter="sara", base="nf4"))  # Ω is computed on W0 before quantization
