"""LISA and OwLore layer sampling (METHODS.md cards 49, 46) and the full-weight adapter they train.

Closed forms: OWL's outlier ratio on hand-made matrices, input norms that skip padding; the draw's
frequencies (χ² over 10k rounds: uniform for LISA and for equal outlier ratios, ∝ weight for one layer a
round); then the real client and a real in-process federation: exactly the sampled layers (and the head)
change and travel, every other layer is bit-identical.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from common.config import RunConfig
from common.errors import ConfigError, FedloraError
from common.layer_sampling import (freeze_other_layers, input_norms, layer_index, layer_weights, layers_of,
                                   outlier_ratio, sample_layers)


def test_layer_index_reads_the_transformer_layer_and_nothing_else():
    assert layer_index("bert.encoder.layer.3.attention.self.query.full_delta.weight") == 3
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_index("classifier.weight") is None
    assert layer_index("bert.embeddings.word_embeddings.weight") is None
    assert layers_of(["a.layer.2.q", "a.layer.0.q", "a.layer.2.v", "head.w"]) == [0, 2]


def test_the_draw_is_a_pure_function_of_seed_and_round():
    draws = [sample_layers([1.0] * 6, 2, seed=7, server_round=r) for r in range(1, 50)]
    assert draws == [sample_layers([1.0] * 6, 2, seed=7, server_round=r) for r in range(1, 50)]
    assert all(len(set(d)) == 2 and list(d) == sorted(d) for d in draws)
    assert draws != [sample_layers([1.0] * 6, 2, seed=8, server_round=r) for r in range(1, 50)]


@pytest.mark.parametrize("weights", [[1.0] * 6, [0.37] * 6], ids=["lisa", "owlore-equal-ratios"])
def test_each_layer_is_drawn_with_frequency_gamma_over_n(weights):
    """10k rounds of 2 of 6 layers: each layer's count is ~ 10k * 2/6 (χ², uniform expected counts)."""
    counts = Counter(layer for r in range(10_000) for layer in sample_layers(weights, 2, seed=3, server_round=r))
    observed = [counts[i] for i in range(6)]
    assert sum(observed) == 20_000
    assert chisquare(observed).pvalue > 1e-3


def test_one_layer_a_round_is_drawn_with_probability_proportional_to_its_weight():
    weights = [0.1, 0.0, 0.3, 0.6]
    counts = Counter(sample_layers(weights, 1, seed=5, server_round=r)[0] for r in range(10_000))
    assert counts[1] == 0  # an outlier ratio of 0: never drawn
    observed = [counts[i] for i in (0, 2, 3)]
    assert chisquare(observed, f_exp=[1_000, 3_000, 6_000]).pvalue > 1e-3


def test_outlier_ratio_is_the_share_of_scores_above_threshold_times_their_mean():
    # A = |W| * norms (per input column): [[1, 1], [1, 10]] -> mean 3.25; above 2 x 3.25 = 6.5: one of four
    assert outlier_ratio([torch.tensor([[1.0, -1.0], [1.0, 10.0]])], [torch.ones(2)], 2.0) == 0.25
    # the input norm scales a column: |W| = [[1, 2]], norms [3, 1] -> A = [3, 2]; mean 2.5, above 1.1 x 2.5: one
    assert outlier_ratio([torch.tensor([[1.0, 2.0]])], [torch.tensor([3.0, 1.0])], 1.1) == 0.5
    # pooled over the layer's matrices: the mean is over all of them
    pooled = outlier_ratio([torch.ones(2, 2), torch.full((1, 2), 9.0)], [torch.ones(2), torch.ones(2)], 2.0)
    assert pooled == pytest.approx(2 / 6)  # mean (4 + 18) / 6 = 3.67, above 7.33: the two 9s


class _Tiny(nn.Module):
    """An embedding then one linear: the hooked module sees the embedded tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.proj = nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.embed(input_ids))


def test_input_norms_sum_the_squares_of_the_real_tokens_only():
    torch.manual_seed(0)
    model = _Tiny()
    ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    data = torch.utils.data.TensorDataset(ids, mask, torch.zeros(2, dtype=torch.long))
    norms = input_norms(model, ["proj"], data, batch_size=1, device=torch.device("cpu"))
    rows = model.embed.weight.detach()[torch.tensor([1, 2, 3])]  # token 0 is padding: not counted
    torch.testing.assert_close(norms["proj"], rows.pow(2).sum(dim=0).sqrt())


def test_freezing_keeps_the_chosen_layers_and_everything_outside_layers():
    model = nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]), "head": nn.Linear(2, 1)})
    freeze_other_layers(model, [1])
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "head.bias", "head.weight", "layer.1.bias", "layer.1.weight"]


@pytest.mark.parametrize("overrides, fragment", [
    ({"strategy": "hetlora"}, "cannot run with strategy 'hetlora'"),
    ({"rank_growth": "incre_lora"}, "cannot be combined with rank-growth"),
    ({"store_contributions": True}, "cannot be combined with store-contributions"),
    ({"user_clip_norm": 1.0, "user_noise_multiplier": 1.0}, "cannot be combined with user-clip-norm"),
    ({"layers_per_round": 0}, "layers-per-round = 0 is invalid"),
    ({"owlore_threshold": 0.0}, "owlore-threshold = 0.0 is invalid"),
])
def test_layer_sampling_the_run_cannot_do_is_one_line_before_training(overrides, fragment):
    settings = {**RunConfig(strategy="fedavg_lora", layer_sampling="lisa").to_flower(),
                **{k.replace("_", "-"): v for k, v in overrides.items()}}
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flower(settings)


def test_more_layers_a_round_than_the_model_has_is_refused():
    config = RunConfig(strategy="fedavg_lora", adapter="full", layer_sampling="lisa", layers_per_round=7)
    with pytest.raises(ConfigError, match=r"layers-per-round = 7 but 6 layers hold trainable tensors"):
        layer_weights(config, list(range(6)))


def test_the_client_trains_and_sends_the_sampled_layers_and_the_head_only(tmp_path):
    """One DP round of adapter `full` on layers (1, 4) with `train-embeddings` (the card's LISA): those ΔW, the
    embeddings and the head change and travel; no other tensor does."""
    from client.train_round import ClientIdentity, train_round
    from common.model import build_model
    from common.payload import trainable_state
    from tests.conftest import write_toy_csv

    config = RunConfig(dataset=str(write_toy_csv(tmp_path, per_class=12)), examples_per_class=0, adapter="full",
                       strategy="fedavg_lora", layer_sampling="lisa", local_steps=2, batch_size=8, max_seq_len=12,
                       target_epsilon=8.0, delta=1e-3, train_embeddings=True)
    start = trainable_state(build_model(config, num_labels=3).model)
    outcome = train_round(config, ClientIdentity("0", 0, 1, tmp_path / "ledgers"), start, (), 1, train_layers=(1, 4))
    sent_layers = {layer_index(k) for k in outcome.arrays}
    assert sent_layers == {1, 4, None}
    assert {k for k in outcome.arrays if layer_index(k) is None} == {
        "classifier.weight", "classifier.bias", "bert.embeddings.word_embeddings.weight"}
    for key, value in outcome.arrays.items():
        assert not np.array_equal(value, start[key]), key  # every sent tensor trained
    assert outcome.metrics["steps"] == 2 and np.isfinite(outcome.metrics["epsilon"])


def test_a_bad_train_layers_instruction_is_a_client_error_not_a_traceback():
    from flwr.app import ConfigRecord

    from client.client_app import layer_list

    assert layer_list(ConfigRecord({})) is None
    assert layer_list(ConfigRecord({"train-layers": "0,5"})) == (0, 5)
    with pytest.raises(FedloraError, match="is not a list of layer numbers"):
        layer_list(ConfigRecord({"train-layers": "x"}))


def test_galore_on_full_weights_moves_each_matrix_within_its_rank_r_projection(tmp_path):
    """GaLore for full-parameter training: adapter `full`, one projector in the round (period > steps): each
    ΔW after a DP round has rank <= galore-rank, and Adam's state is r x n per matrix, not m x n."""
    from client.dp_training import DPSettings, fresh_generator, train_locally
    from client.train_round import training_parts
    from common.data.partition import client_data
    from common.model import build_model
    from common.tensors import encode
    from tests.conftest import write_toy_csv

    config = RunConfig(dataset=str(write_toy_csv(tmp_path, per_class=12)), examples_per_class=0, adapter="full",
                       strategy="fedavg_lora", update_rule="galore", galore_rank=3, galore_period=10,
                       target_modules="query", batch_size=8, max_seq_len=12)
    adapted = build_model(config, num_labels=3)
    data = encode(adapted.tokenizer, client_data(config, 0, 1).train, config.max_seq_len)
    result = train_locally(adapted.model, data, steps=3, batch_size=8, lr=1e-3,
                           dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), device=torch.device("cpu"),
                           sampling_generator=fresh_generator(torch.device("cpu"), seed=0),
                           **training_parts(config, adapted.model, server_round=1))
    deltas = [m.full_delta.weight.detach() for m in adapted.model.modules() if hasattr(m, "full_delta")]
    assert len(deltas) == 6
    for delta in deltas:
        assert delta.abs().max() > 0
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) <= 3
    head = sum(p.numel() for n, p in adapted.model.named_parameters() if n.startswith("classifier"))
    # per ΔW: two 3 x 384 moments and the 384 x 3 projector; Adam would keep two 384 x 384 moments
    assert result.optimizer_state_bytes == 4 * (6 * (2 * 3 * 384 + 384 * 3) + 2 * head)


def _federation_settings(tmp_path, **overrides) -> dict:
    from tests.conftest import write_toy_csv

    return RunConfig(dataset=str(write_toy_csv(tmp_path, per_class=16)), examples_per_class=0, num_rounds=2,
                     clients_per_round=2, local_steps=1, batch_size=8, max_seq_len=12, target_epsilon=8.0, delta=1e-3,
                     strategy="fedavg_lora", adapter="full", target_modules="query", partitioner="iid",
                     layers_per_round=2, run_dir=str(tmp_path / "run"), **overrides).to_flower()


def _changed_layers(before: dict, after: dict) -> set:
    return {layer_index(k) for k in after if not np.array_equal(before[k], after[k])}


@pytest.mark.parametrize("sampler, rule", [("lisa", "adam"), ("owlore", "galore")])
def test_a_federated_run_trains_the_drawn_layers_and_leaves_the_others_bit_identical(tmp_path, sampler, rule):
    """The real ServerApp and ClientApp in process, 2 rounds of 2 clients: each round's global changes in exactly
    the layers drawn for it (the server's draw from seed and round) and the head; the replies carried those:
    dense ΔW under Adam (LISA), rank-4 factor pairs under GaLore (OwLore as the card has it)."""
    from safetensors.numpy import load_file

    from common.model import build_model
    from common.payload import trainable_state
    from tests.federation import InProcessFederation, run_server

    settings = _federation_settings(tmp_path, layer_sampling=sampler, owlore_threshold=2.0, public_examples=12,
                                    update_rule=rule)
    config = RunConfig.from_flower(settings)
    federation = InProcessFederation(settings, num_nodes=2)
    sent_layers = []
    real = federation.send_and_receive

    def recording(messages, timeout=None):
        messages = list(messages)
        sent_layers.extend(m.content["config"]["train-layers"] for m in messages if m.metadata.message_type == "train")
        return real(messages, timeout)

    federation.send_and_receive = recording
    run_dir = run_server(federation, settings)

    weights = layer_weights(config, list(range(6)))
    drawn = [sample_layers(weights, 2, config.seed, r) for r in (1, 2)]
    assert sent_layers == [",".join(map(str, d)) for d in drawn for _ in range(2)]
    if sampler == "owlore":
        assert len(set(weights)) > 1 and all(weights[i] > 0 for d in drawn for i in d)
    start = trainable_state(build_model(config, num_labels=3).model)
    final = load_file(str(run_dir / "adapter.safetensors"))
    assert _changed_layers(start, final) == set(drawn[0]) | set(drawn[1]) | {None}
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    per_layer = 384 * 384 * 4 if rule == "adam" else 4 * (384 + 384) * 4  # one query ΔW, float32, or its factors
    head = sum(v.nbytes for k, v in start.items() if layer_index(k) is None)
    assert [row["bytes-up"] for row in rows[1:]] == [2 * (2 * per_layer + head)] * 2  # 2 clients x (2 layers + head)
    if rule == "galore":  # a round adds the mean of two clients' rank-4 changes: rank <= 8 a round, 16 after two
        for key in (k for k in final if layer_index(k) is not None and not np.array_equal(final[k], start[k])):
            change = final[key] - start[key]
            assert np.linalg.matrix_rank(change, tol=1e-5 * np.abs(change).max()) <= 16


@pytest.mark.slow  # 3 DP rounds of 2 clients on the real MiniLM with a restart: ~30 s on busy cores
def test_a_resumed_lisa_server_draws_the_layers_an_uninterrupted_one_would(tmp_path):
    """The server dies before round 3 and is started again: round 3's instruction names the layers
    `sample_layers(seed, 3)` gives, as rounds 1 and 2 did before the restart."""
    from tests.federation import CrashingFederation, ServerKilled, run_server

    settings = RunConfig.from_flower({**_federation_settings(tmp_path, layer_sampling="lisa"), "num-rounds": 3}
                                     ).to_flower()
    federation = CrashingFederation(settings, kill_at_round=3)
    sent: list[tuple[int, str]] = []
    real = federation.send_and_receive

    def recording(messages, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train":
                sent.append((m.content["config"]["server-round"], m.content["config"]["train-layers"]))
        return real(messages, timeout)

    federation.send_and_receive = recording
    with pytest.raises(ServerKilled):
        run_server(federation, settings)
    federation.kill = False
    run_server(federation, settings)
    expected = {r: ",".join(map(str, sample_layers([1.0] * 6, 2, 42, r))) for r in (1, 2, 3)}
    assert sorted(set(sent)) == sorted(expected.items())
