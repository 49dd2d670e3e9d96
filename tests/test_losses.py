"""Training losses (common/training/losses.py) under per-sample clipping.

The guard behind DP-SGD: for every loss a run may train with under DP, the per-sample gradients Opacus
computes equal the gradients of the loss on one example at a time, so clipping them bounds each example's
influence. A term that couples the examples of a batch (BA-LoRA's covariance of the logits) fails that: the
"per-sample" gradient of one example moves when another example changes. Such a term is refused under DP.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from client.dp_training import DPSettings, train_locally
from common.config import RunConfig
from common.errors import ConfigError
from common.training import training_loss
from common.training.losses import adapters_off, ba_lora_loss, base_model_logits, consistency, diversity
from tests.test_dp_step import BATCH, poisson_batch, toy_data
from tests.test_training_pieces import CLIP, NOISE_SEED, SAMPLING_SEED, SIGMA, Tiny, assert_same_parameters, trainable

PER_EXAMPLE = {"cross_entropy": RunConfig(), "ba_lora": RunConfig(loss="ba_lora", ba_lora_consistency=0.5)}
COUPLED = RunConfig(loss="ba_lora", ba_lora_consistency=0.5, ba_lora_diversity=2.0, target_epsilon=float("inf"))


def batch_loss(model, config: RunConfig, ids, mask, labels):
    bound = training_loss(config)
    logits = model(input_ids=ids, attention_mask=mask).logits
    if bound.base_logits:
        return bound.fn(logits, labels, base_model_logits(model, input_ids=ids, attention_mask=mask))
    return bound.fn(logits, labels)


def opacus_per_sample(config: RunConfig, ids, mask, labels) -> list[torch.Tensor]:
    """Opacus' per-sample gradients (batch x parameter shape) of the batch-mean loss, as DP-SGD clips them."""
    model = GradSampleModule(Tiny(), batch_first=True, loss_reduction="mean")
    batch_loss(model, config, ids, mask, labels).backward()
    samples = [p.grad_sample.detach().clone() for p in model.parameters() if p.requires_grad]
    model._close()
    return samples


def one_at_a_time(config: RunConfig, ids, mask, labels) -> list[torch.Tensor]:
    model = Tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(batch_loss(model, config, ids[i:i + 1], mask[i:i + 1], labels[i:i + 1]), params)
             for i in range(len(labels))]
    return [torch.stack(per_param) for per_param in zip(*grads)]


def first_batch():
    ids, mask, labels = toy_data().tensors
    return ids[:5], mask[:5], labels[:5]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_opacus_per_sample_gradients_of_every_allowed_loss_equal_one_example_at_a_time(name):
    config = PER_EXAMPLE[name]
    batch = first_batch()
    for ours, brute in zip(opacus_per_sample(config, *batch), one_at_a_time(config, *batch)):
        torch.testing.assert_close(ours, brute, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_batch_coupled_loss_breaks_per_sample_clipping_and_is_refused_under_dp():
    ids, mask, labels = first_batch()
    other_ids = ids.clone()
    other_ids[1] = toy_data().tensors[0][30]  # change example 1 only
    for config, coupled in ((PER_EXAMPLE["ba_lora"], False), (COUPLED, True)):
        before = opacus_per_sample(config, ids, mask, labels)
        after = opacus_per_sample(config, other_ids, mask, labels)
        moved = max(float((b[0] - a[0]).abs().max()) for b, a in zip(before, after))  # example 0's gradient
        assert (moved > 1e-4) is coupled, (config.ba_lora_diversity, moved)
    with pytest.raises(ConfigError, match="loss = 'ba_lora' with ba-lora-diversity = 2 .*couples the examples of a "
                                          "batch, so DP-SGD's per-sample clipping would no longer bound"):
        RunConfig.from_flower({"loss": "ba_lora", "ba-lora-diversity": 2.0})
    RunConfig.from_flower({"loss": "ba_lora", "ba-lora-diversity": 2.0, "target-epsilon": float("inf")})  # no DP: fine
    RunConfig.from_flower({"loss": "ba_lora"})  # consistency only: per example, allowed under DP


def test_ba_lora_without_weights_is_cross_entropy_bit_for_bit_and_consistency_is_zero_for_a_zero_adapter():
    torch.manual_seed(0)
    logits, base, labels = torch.randn(6, 3), torch.randn(6, 3), torch.randint(0, 3, (6,))
    assert torch.equal(ba_lora_loss(0.0, 0.0)(logits, labels, base), F.cross_entropy(logits, labels))
    model = Tiny()
    with torch.no_grad():
        model.proj.lora_B.weight.zero_()  # LoRA's init: B = 0, the adapter adds nothing
    ids, mask, _ = first_batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    assert float(consistency(out, base_model_logits(model, input_ids=ids, attention_mask=mask)).detach()) == 0.0
    assert float(diversity(out[:1]).detach()) == 0.0


def test_adapters_off_is_the_base_model_and_restores_the_adapter():
    model = Tiny()
    ids, mask, _ = first_batch()
    with_adapter = model(input_ids=ids, attention_mask=mask).logits
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.proj.lora_B.weight.zero_()
    with adapters_off(model):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   zeroed(input_ids=ids, attention_mask=mask).logits)
    assert not model.proj.merged and model.training
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, with_adapter)


def test_ba_lora_dp_step_equals_the_hand_computed_dp_sgd_step_of_that_loss():
    """The textbook DP-SGD step (tests/test_dp_step.py) with BA-LoRA's loss, through train_locally and Opacus."""
    config = PER_EXAMPLE["ba_lora"]
    bound = training_loss(config)
    model = Tiny()
    reference = copy.deepcopy(model)
    train_locally(model, toy_data(), steps=1, batch_size=BATCH, lr=1.0, optimizer_name="sgd",
                  dp=DPSettings(noise_multiplier=SIGMA, max_grad_norm=CLIP), device=torch.device("cpu"),
                  sampling_generator=torch.Generator().manual_seed(SAMPLING_SEED),
                  noise_generator=torch.Generator().manual_seed(NOISE_SEED), loss_fn=bound.fn,
                  base_logits=bound.base_logits)

    ids, mask, labels = toy_data().tensors
    index = poisson_batch(SAMPLING_SEED)
    per_example = one_at_a_time(config, ids[index], mask[index], labels[index])
    plain = one_at_a_time(RunConfig(), ids[index], mask[index], labels[index])
    assert not torch.allclose(per_example[0], plain[0]), "the consistency term must change the gradient"
    params = [p for _, p in trainable(reference)]
    noise = torch.Generator().manual_seed(NOISE_SEED)
    norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in per_example))
    factors = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for p, g in zip(params, per_example):
            total = (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0)
            p -= (total + torch.normal(0.0, SIGMA * CLIP, total.shape, generator=noise)) / BATCH
    assert_same_parameters(model, reference)


def test_run_config_selects_the_loss():
    assert training_loss(RunConfig()).fn is F.cross_entropy and not training_loss(RunConfig()).base_logits
    assert training_loss(RunConfig(loss="ba_lora")).base_logits
    with pytest.raises(ConfigError, match="unknown loss 'focal'; available: ba_lora, cross_entropy"):
        RunConfig.from_flower({"loss": "focal"})
    with pytest.raises(ConfigError, match="ba-lora-consistency = -1.0 is invalid"):
        RunConfig.from_flower({"loss": "ba_lora", "ba-lora-consistency": -1.0})
