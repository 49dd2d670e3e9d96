"""Training pieces (common/training/): update rules, rank schedules and proximal steps under DP-SGD.

The post-processing tests drive `train_locally` through Opacus and compare with the hand-computed DP-SGD
gradient of tests/test_dp_step.py (seeded Poisson batch, per-example clipping, seeded noise, / expected
batch size) fed to the piece by hand: the piece saw exactly the privatized gradient, nothing else.
The closed-form tests check each piece's own math on tiny tensors.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from client.dp_training import DPSettings, train_locally
from common.adapters.lora import LoRAConfig, LoRALinear
from common.adapters.sora import SoRALinear, pruned_lora
from common.config import RunConfig
from common.errors import ConfigError
from common.training import optimizer_factory, step_pieces
from common.training.dylora import DyLoRASchedule, rank_sequence
from common.training.galore import GaLoreAdam, galore_projector
from common.training.prox import GateProx, soft_threshold
from server.strategies import check_compatible
from tests.test_dp_step import BATCH, CLASSES, SEQ, VOCAB, WIDTH, hand_dp_gradient, poisson_batch, toy_data

RANK, SIGMA, CLIP, SAMPLING_SEED, NOISE_SEED = 4, 0.7, 0.05, 3, 11


class Tiny(nn.Module):
    """Frozen embedding -> adapter layer (LoRA or SoRA, rank 4) -> mean pool -> head, called like HF."""

    def __init__(self, layer_class=LoRALinear):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH).requires_grad_(False)
        self.proj = layer_class(nn.Linear(WIDTH, WIDTH), LoRAConfig(rank=RANK, alpha=8.0), "proj")
        with torch.no_grad():  # B = 0 would leave A without gradient
            self.proj.lora_B.weight.normal_(0, 0.5)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, input_ids, attention_mask):
        hidden = self.proj(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(logits=self.head((hidden * mask).sum(1) / mask.sum(1)))


def one_dp_step(model, **kwargs):
    return train_locally(model, toy_data(), steps=1, batch_size=BATCH, lr=kwargs.pop("lr", 1.0),
                         dp=DPSettings(noise_multiplier=SIGMA, max_grad_norm=CLIP), device=torch.device("cpu"),
                         sampling_generator=torch.Generator().manual_seed(SAMPLING_SEED),
                         noise_generator=torch.Generator().manual_seed(NOISE_SEED), **kwargs)


def private_gradient(reference) -> list[torch.Tensor]:
    """The clipped, summed, noised, averaged gradient of the first Poisson batch, computed by hand."""
    return hand_dp_gradient(reference, toy_data(), poisson_batch(SAMPLING_SEED), SIGMA, CLIP, NOISE_SEED,
                            expected_batch=BATCH)


def trainable(model) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def assert_same_parameters(model, reference):
    after = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(after[name].detach(), p.detach(), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("rule", ["adam", "sgd", "galore"])
def test_update_rule_acts_on_the_hand_computed_clipped_and_noised_gradient(rule):
    """rule(private gradient): the default Adam, SGD, and GaLore at rank 1 (every matrix projected)."""
    config = RunConfig(update_rule=rule, galore_rank=1, galore_period=1)
    model = Tiny()
    reference = copy.deepcopy(model)
    one_dp_step(model, make_optimizer=optimizer_factory(config), lr=0.1)

    grads = private_gradient(reference)
    named = trainable(reference)
    for (_, p), g in zip(named, grads):
        p.grad = g
    optimizer_factory(config)(named, 0.1).step()
    assert_same_parameters(model, reference)


def test_default_update_rule_is_plain_torch_adam():
    config = RunConfig()
    assert config.update_rule == "adam" and config.rank_schedule == "none"
    optimizer = optimizer_factory(config)(trainable(Tiny()), 0.03)
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 0.03
    assert step_pieces(config, Tiny(), server_round=1) == []


def test_soft_threshold_closed_form():
    torch.testing.assert_close(soft_threshold(torch.tensor([3.0, -0.5, 1.0]), 1.0), torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(soft_threshold(torch.tensor([-3.0, 0.2, 0.0]), 0.5), torch.tensor([-2.5, 0.0, 0.0]))


def test_sora_prox_is_soft_thresholding_of_the_sgd_step_on_the_private_gradient():
    lr, sparsity = 0.5, 0.3
    model = Tiny(SoRALinear)
    with torch.no_grad():
        model.proj.sora_gate.weight.copy_(torch.tensor([1.0, 0.05, -0.4, 0.12]))
    reference = copy.deepcopy(model)
    pieces = step_pieces(RunConfig(adapter="sora", lr=lr, sora_lambda=sparsity), model, server_round=1)
    assert [type(p) for p in pieces] == [GateProx]
    one_dp_step(model, optimizer_name="sgd", lr=lr, pieces=pieces)

    grads = dict(zip([n for n, _ in trainable(reference)], private_gradient(reference)))
    gate = reference.proj.sora_gate.weight.detach()
    expected = soft_threshold(gate - lr * grads["proj.sora_gate.weight"], lr * sparsity)
    torch.testing.assert_close(model.proj.sora_gate.weight.detach(), expected, atol=1e-6, rtol=1e-5)
    assert (expected == 0).any(), "the threshold must zero at least one gate for this test to mean something"


def test_sora_with_unit_gates_is_lora_and_pruning_keeps_the_output():
    lora, sora = Tiny(LoRALinear).proj, Tiny(SoRALinear).proj
    x = torch.randn(2, SEQ, WIDTH)
    torch.testing.assert_close(sora(x), lora(x))
    with torch.no_grad():
        sora.sora_gate.weight.copy_(torch.tensor([0.0, 1.5, 0.0, -0.7]))
    a, b = pruned_lora(sora)
    assert a.shape == (2, WIDTH) and b.shape == (WIDTH, 2)
    assert a.numel() + b.numel() == 2 * (WIDTH + WIDTH)  # |S| (d_in + d_out)
    torch.testing.assert_close(sora.base(x) + sora.scaling * x @ a.T @ b.T, sora(x))
    torch.testing.assert_close(sora.delta_weight(), sora.scaling * b @ a)


def dylora_layer(b: int) -> tuple[LoRALinear, DyLoRASchedule]:
    model = Tiny()
    schedule = DyLoRASchedule(model, seed=42, server_round=1, steps=1)
    schedule.sequence = [b]
    schedule.before_forward(0)
    return model.proj, schedule


def test_dylora_at_rank_b_ignores_components_above_b_and_scales_by_alpha_over_b():
    b = 2
    layer, schedule = dylora_layer(b)
    x = torch.randn(3, SEQ, WIDTH)
    a, bb = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    expected = layer.base(x) + (8.0 / b) * x @ a[:b].T @ bb[:, :b].T
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        layer.lora_A.weight[b:] += 5.0
        layer.lora_B.weight[:, b:] -= 3.0
    torch.testing.assert_close(layer(x), expected)
    schedule.close()
    assert layer.rank_mask is None and layer.scaling == pytest.approx(8.0 / RANK)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dylora_per_sample_gradients_above_b_are_zero():
    b = 1
    layer, _ = dylora_layer(b)
    wrapped = GradSampleModule(nn.Sequential(layer), batch_first=True, loss_reduction="sum")
    wrapped(torch.randn(5, SEQ, WIDTH)).pow(2).sum().backward()
    a_samples, b_samples = layer.lora_A.weight.grad_sample, layer.lora_B.weight.grad_sample
    assert a_samples[:, b:].abs().max() == 0 and b_samples[:, :, b:].abs().max() == 0
    assert a_samples[:, :b].abs().max() > 0 and b_samples[:, :, :b].abs().max() > 0
    wrapped._close()


def test_dylora_dp_step_trains_exactly_the_first_b_ranks_on_the_private_gradient():
    b = 2
    model = Tiny()
    reference = copy.deepcopy(model)
    schedule = DyLoRASchedule(model, seed=42, server_round=1, steps=1)
    schedule.sequence = [b]
    one_dp_step(model, optimizer_name="sgd", pieces=[schedule])

    ref_schedule = DyLoRASchedule(reference, seed=42, server_round=1, steps=1)
    ref_schedule.sequence = [b]
    ref_schedule.before_forward(0)  # the hand gradient is taken through the masked, α/b-scaled forward
    grads = dict(zip([n for n, _ in trainable(reference)], private_gradient(reference)))
    ref_schedule.close()
    grads["proj.lora_A.weight"][b:] = 0  # the noise on the masked ranks is dropped
    grads["proj.lora_B.weight"][:, b:] = 0
    with torch.no_grad():
        for name, p in trainable(reference):
            p -= grads[name]
    assert_same_parameters(model, reference)
    assert model.proj.rank_mask is None and model.proj.scaling == pytest.approx(8.0 / RANK)


def test_dylora_ranks_are_seeded_by_run_seed_and_round_only():
    first = rank_sequence(seed=42, server_round=3, rank=RANK, steps=50)
    assert first == rank_sequence(seed=42, server_round=3, rank=RANK, steps=50)  # every client, every rerun
    assert first != rank_sequence(seed=42, server_round=4, rank=RANK, steps=50)
    assert set(first) == set(range(1, RANK + 1))


def test_galore_at_full_rank_is_torch_adam():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    ours, theirs = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    galore = GaLoreAdam([ours], lr=0.1, rank=5, period=2, scale=0.25)
    adam = torch.optim.Adam([theirs], lr=0.1)
    for _ in range(4):
        g = torch.randn(5, 7)
        ours.grad, theirs.grad = g.clone(), g.clone()
        galore.step()
        adam.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)], ids=["left", "right"])
def test_galore_update_lies_in_the_projector_span_and_its_first_step_is_projected_adam(shape):
    torch.manual_seed(1)
    rank, lr, scale = 2, 0.1, 0.25
    p = nn.Parameter(torch.randn(*shape))
    optimizer = GaLoreAdam([p], lr=lr, rank=rank, period=10, scale=scale)
    g = torch.randn(*shape)
    projector, side = galore_projector(g, rank)
    torch.testing.assert_close(projector.T @ projector, torch.eye(rank), atol=1e-5, rtol=0)
    before = p.detach().clone()
    p.grad = g
    optimizer.step()
    delta = p.detach() - before
    residual = (torch.eye(shape[0]) - projector @ projector.T) @ delta if side == "left" else \
        delta @ (torch.eye(shape[1]) - projector @ projector.T)
    assert float(residual.abs().max()) < 1e-5
    low = projector.T @ g if side == "left" else g @ projector  # Adam's first step: R / (|R| + eps)
    direction = low / (low.abs() + 1e-8)
    expected = projector @ direction if side == "left" else direction @ projector.T
    torch.testing.assert_close(delta, -lr * scale * expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides,fragment", [
    ({"rank-schedule": "dylora", "adapter": "nola"},
     "rank-schedule = 'dylora' truncates the rank dimension.*adapter 'nola' trains nola_A, nola_B"),
    ({"rank-schedule": "dylora", "adapter": "lora_xs"}, "adapter 'lora_xs' trains lora_R.*use adapter 'lora' or 'sora'"),
    ({"rank-schedule": "dylora", "client-ranks": "2,4", "rank": 4, "strategy": "flexlora"},
     "rank-schedule = 'dylora' with client-ranks trains nested rank prefixes.*strategy 'flexlora'.*use strategy "
     "'hetlora'"),
    ({"rank-schedule": "linear"}, "unknown rank-schedule 'linear'; available: dylora, none"),
    ({"update-rule": "lion"}, "unknown update-rule 'lion'; available: adam, frugal, galore, lora_pro, sgd"),
    ({"galore-rank": 0}, "galore-rank = 0 is invalid"),
    ({"sora-lambda": -1.0}, "sora-lambda = -1.0 is invalid"),
])
def test_incompatible_training_pieces_fail_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flower(overrides)


def test_valid_combinations_parse():
    for overrides in ({"rank-schedule": "dylora"}, {"rank-schedule": "dylora", "adapter": "sora"},
                      {"update-rule": "galore", "adapter": "nola"}, {"update-rule": "sgd"}):
        RunConfig.from_flower(overrides)


def test_sora_is_refused_by_strategies_that_refactor_ranks():
    with pytest.raises(ConfigError, match="strategy 'fedsvd' re-factors B A into new ranks each round, but each "
                                          "rank of adapter 'sora' has its own gate"):
        check_compatible("fedsvd", "sora")
    check_compatible("fedavg_lora", "sora")
    check_compatible("ffa_lora", "sora")


def test_step_pieces_order_prox_before_the_rank_schedule():
    config = RunConfig(adapter="sora", rank_schedule="dylora", rank=RANK, local_steps=3)
    pieces = step_pieces(config, Tiny(SoRALinear), server_round=2)
    assert [type(p) for p in pieces] == [GateProx, DyLoRASchedule]
    assert math.isclose(pieces[0].tau, config.lr * config.sora_lambda)
    assert pieces[1].sequence == rank_sequence(config.seed, 2, RANK, 3)



def test_a_rank_heterogeneous_dylora_client_trains_prefixes_of_its_own_rank_at_the_global_alpha_over_b():
    """client-ranks with DyLoRA (hetlora): a rank-2 client of an r_max = 4 run draws b in {1, 2} and trains
    prefix b at alpha/b (the scale that prefix has in the global adapter), not at the padded alpha/r_max."""
    from common.ranks import config_for_rank

    config = RunConfig.from_flower({"rank-schedule": "dylora", "client-ranks": "2,4", "rank": 4, "alpha": 8.0,
                                    "strategy": "hetlora", "local-steps": 12})
    small = config_for_rank(config, 2)
    assert (small.rank, small.alpha) == (2, 8.0)
    assert config_for_rank(RunConfig(client_ranks="2,4", rank=4, alpha=8.0, strategy="hetlora"), 2).alpha == 4.0
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(6, 5), LoRAConfig(rank=small.rank, alpha=small.alpha), "layer"))
    schedule = DyLoRASchedule(model, seed=config.seed, server_round=1, steps=config.local_steps)
    assert set(schedule.sequence) == {1, 2} and schedule.sequence == rank_sequence(config.seed, 1, 2, 12)
    for step, b in enumerate(schedule.sequence):
        schedule.before_forward(step)
        assert model[0].scaling == pytest.approx(8.0 / b)
    schedule.close()


@pytest.mark.slow  # one DP round of 2 clients on the real MiniLM: ~20 s on busy cores
def test_a_hetlora_federation_with_dylora_trains_each_client_at_its_own_rank(tmp_path, monkeypatch):
    """The real ServerApp and ClientApp in process: client-ranks "2,4" of r_max = 4 with DyLoRA under hetlora;
    client 0 draws prefixes b <= 2, client 1 b <= 4, and the server merges a rank-4 global."""
    import json

    import common.training.dylora as dylora
    from safetensors.numpy import load_file

    from tests.conftest import write_toy_csv
    from tests.federation import InProcessFederation, run_server

    drawn: list[tuple[int, list[int]]] = []
    real = dylora.rank_sequence

    def recording(seed, server_round, rank, steps):
        drawn.append((rank, real(seed, server_round, rank, steps)))
        return drawn[-1][1]

    monkeypatch.setattr(dylora, "rank_sequence", recording)
    settings = RunConfig(dataset=str(write_toy_csv(tmp_path, per_class=16)), examples_per_class=0, num_rounds=1,
                         clients_per_round=2, local_steps=6, batch_size=8, max_seq_len=12, target_epsilon=8.0,
                         delta=1e-3, rank=4, client_ranks="2,4", strategy="hetlora", rank_schedule="dylora",
                         target_modules="query", partitioner="iid", run_dir=str(tmp_path / "run")).to_flower()
    run_dir = run_server(InProcessFederation(settings, num_nodes=2), settings)
    assert sorted(rank for rank, _ in drawn) == [2, 4]
    assert all(1 <= b <= rank for rank, sequence in drawn for b in sequence)
    final = load_file(str(run_dir / "adapter.safetensors"))
    assert {v.shape[0] for k, v in final.items() if k.endswith("lora_A.weight")} == {4}
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rows[-1]["clients-trained"] == 2
