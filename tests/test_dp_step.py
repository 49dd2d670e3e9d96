"""One DP-SGD step through `train_locally` equals the textbook computation done by hand.

Hand computation (Abadi et al. 2016, as Opacus implements it): the Poisson batch the seeded sampler
draws; each example's gradient computed on its own; the joint norm over all trainable tensors clipped to
C (factor min(1, C / (norm + 1e-6))); the clipped gradients summed; Gaussian noise N(0, (σC)^2) drawn
from the seeded generator per trainable tensor in parameter order; the sum divided by the expected batch
size n·q. With SGD at lr = 1 the parameter moves by exactly minus that gradient.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from client.dp_training import DPSettings, train_locally
from common.adapters.lora import LoRAConfig, LoRALinear

VOCAB, WIDTH, CLASSES, SEQ = 50, 12, 3, 5
NUM_EXAMPLES, BATCH = 40, 8  # sample rate 1/5, expected batch size 8


class TinyClassifier(nn.Module):
    """Frozen embedding -> LoRA projection -> mean pool -> head, called like a HF model."""

    def __init__(self, freeze_a: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.embed.requires_grad_(False)
        self.proj = LoRALinear(nn.Linear(WIDTH, WIDTH), LoRAConfig(rank=2, alpha=4.0), "proj")
        with torch.no_grad():  # B = 0 at init would make A's gradient zero: start from a non-trivial B
            self.proj.lora_B.weight.normal_(0, 0.5)
        self.proj.lora_A.requires_grad_(not freeze_a)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, input_ids, attention_mask):
        hidden = self.proj(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(logits=self.head((hidden * mask).sum(1) / mask.sum(1)))


def toy_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (NUM_EXAMPLES, SEQ), generator=g)
    return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, CLASSES, (NUM_EXAMPLES,), generator=g))


def hand_dp_gradient(model, data, batch_index, noise_multiplier, clip, noise_seed, expected_batch):
    """Per-example gradients, joint clipping, sum, seeded noise, / expected batch size."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = []
    for i in batch_index:
        ids, mask, label = (t[i : i + 1] for t in data.tensors)
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, label)
        per_example.append(torch.autograd.grad(loss, params))
    summed = [torch.zeros_like(p) for p in params]
    for grads in per_example:
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for total, g in zip(summed, grads):
            total += factor * g
    noise = torch.Generator().manual_seed(noise_seed)
    return [(total + torch.normal(0.0, noise_multiplier * clip, total.shape, generator=noise)) / expected_batch
            for total in summed]


def poisson_batch(sampling_seed: int) -> list[int]:
    """The indices of the first batch Opacus' Poisson loader draws for this seed.

    Which examples get sampled is Opacus' business (the loader also draws a worker seed from the same
    generator first); this test checks what happens to a batch once drawn.
    """
    loader = DPDataLoader.from_data_loader(
        DataLoader(toy_data(), batch_size=BATCH, generator=torch.Generator().manual_seed(sampling_seed)))
    ids = toy_data().tensors[0]
    assert len(torch.unique(ids, dim=0)) == NUM_EXAMPLES, "rows must be unique to be found again"
    return [int((ids == row).all(dim=1).nonzero()) for row in next(iter(loader))[0]]


@pytest.mark.parametrize("freeze_a", [True, False], ids=["A-frozen", "A-trained"])
@pytest.mark.parametrize("clip", [0.05, 100.0], ids=["clipping-active", "no-clipping"])
def test_one_dp_step_equals_hand_computation(freeze_a, clip):
    data, sigma, sampling_seed, noise_seed = toy_data(), 0.7, 3, 11
    model = TinyClassifier(freeze_a)
    reference = copy.deepcopy(model)
    batch = poisson_batch(sampling_seed)
    assert batch, "seed must draw a non-empty batch"

    result = train_locally(
        model, data, steps=1, batch_size=BATCH, lr=1.0, optimizer_name="sgd",
        dp=DPSettings(noise_multiplier=sigma, max_grad_norm=clip), device=torch.device("cpu"),
        sampling_generator=torch.Generator().manual_seed(sampling_seed),
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )

    expected = hand_dp_gradient(reference, data, batch, sigma, clip, noise_seed, expected_batch=BATCH)
    trained = [p for p in reference.parameters() if p.requires_grad]
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    after = dict(model.named_parameters())
    assert result.steps == 1 and result.sample_rate == pytest.approx(BATCH / NUM_EXAMPLES)
    assert ("proj.lora_A.weight" in names) is (not freeze_a)
    for name, before, grad in zip(names, trained, expected):
        torch.testing.assert_close(after[name].detach(), before.detach() - grad, atol=1e-6, rtol=1e-5,
                                   msg=f"{name} differs from the hand-computed DP-SGD update")
    for name, p in reference.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(after[name].detach(), p.detach(), msg=f"frozen {name} moved")


def test_clipping_is_actually_exercised():
    """Guard for the test above: at C = 0.05 every per-example gradient is larger than C."""
    model, data = TinyClassifier(freeze_a=False), toy_data()
    params = [p for p in model.parameters() if p.requires_grad]
    for i in poisson_batch(3):
        ids, mask, label = (t[i : i + 1] for t in data.tensors)
        grads = torch.autograd.grad(F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, label), params)
        assert float(torch.sqrt(sum((g**2).sum() for g in grads))) > 0.05


def test_noise_is_drawn_and_scaled():
    """With σ > 0 the update differs from the noiseless one by the seeded noise / expected batch size."""
    data = toy_data()
    updates = {}
    for sigma in (0.0, 2.0):
        model = TinyClassifier(freeze_a=True)
        before = model.head.weight.detach().clone()
        train_locally(model, data, steps=1, batch_size=BATCH, lr=1.0, optimizer_name="sgd",
                      dp=DPSettings(noise_multiplier=sigma, max_grad_norm=1.0), device=torch.device("cpu"),
                      sampling_generator=torch.Generator().manual_seed(3),
                      noise_generator=torch.Generator().manual_seed(11))
        updates[sigma] = before - model.head.weight.detach()
    g = torch.Generator().manual_seed(11)
    torch.normal(0.0, 2.0, (WIDTH, 2), generator=g)  # noise is drawn in parameter order: lora_B comes first
    noise_head = torch.normal(0.0, 2.0, (CLASSES, WIDTH), generator=g)
    torch.testing.assert_close(updates[2.0] - updates[0.0], noise_head / BATCH, atol=1e-6, rtol=1e-5)


def test_train_locally_takes_the_requested_steps_and_leaves_no_hooks():
    model, data = TinyClassifier(freeze_a=True), toy_data()
    result = train_locally(model, data, steps=7, batch_size=BATCH, lr=0.01,
                           dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), device=torch.device("cpu"))
    assert result.steps == 7  # more than one pass over the 5-batch loader
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks, f"hook left on {module}"
    for p in model.parameters():
        assert getattr(p, "grad_sample", None) is None
    # The module is reusable: a second round wraps it again without errors.
    assert train_locally(model, data, steps=1, batch_size=BATCH, lr=0.01,
                         dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), device=torch.device("cpu")).steps == 1


def test_an_empty_poisson_batch_is_a_pure_noise_step():
    """A Poisson draw of no example still takes the step the accountant counted: the parameters move by
    exactly the seeded noise N(0, (σC)^2) / expected batch size, and the loss of that step is NaN."""
    data = TensorDataset(*(t[:4] for t in toy_data().tensors))  # batch 1 of 4: sample rate 1/4, P(empty) ≈ 0.32
    sampling_seed = next(seed for seed in range(100) if not first_batch_size(data, seed))
    sigma, clip, noise_seed, expected_batch = 0.7, 0.5, 11, 1.0
    model = TinyClassifier(freeze_a=False)
    reference = copy.deepcopy(model)

    result = train_locally(
        model, data, steps=1, batch_size=1, lr=1.0, optimizer_name="sgd",
        dp=DPSettings(noise_multiplier=sigma, max_grad_norm=clip), device=torch.device("cpu"),
        sampling_generator=torch.Generator().manual_seed(sampling_seed),
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )

    assert result.steps == 1 and result.first_loss != result.first_loss  # NaN: no example, no loss
    noise = torch.Generator().manual_seed(noise_seed)
    after = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        expected = p.detach()
        if p.requires_grad:
            expected = expected - torch.normal(0.0, sigma * clip, p.shape, generator=noise) / expected_batch
        torch.testing.assert_close(after[name].detach(), expected, atol=1e-6, rtol=1e-5,
                                   msg=f"{name} is not the pure-noise update")


def first_batch_size(data: TensorDataset, sampling_seed: int) -> int:
    loader = DPDataLoader.from_data_loader(
        DataLoader(data, batch_size=1, generator=torch.Generator().manual_seed(sampling_seed)))
    return len(next(iter(loader))[2])
