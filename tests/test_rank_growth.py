"""Rank growth between rounds (IncreLoRA card 14, TriAdaptLoRA card 30), decided by the server from the
aggregated adapter: closed-form scores and choices, the output unchanged at the moment of growth, the
decision a function of the aggregate only (post-processing), the refusals, and a federated run with a restart.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from common.adapters.lora import LoRAConfig, LoRALinear
from common.adapters.rank_resize import fit_ranks
from common.config import RunConfig
from common.errors import ConfigError
from common.payload import load_state, trainable_state
from server.aggregation import weighted_mean
from server.rank_growth import (RANK_GROWTH, GrowthSettings, grow, incre_lora_scores, layer_ranks, plan_growth,
                                tri_adapt_scores)
from server.strategies.fedavg_lora import FedAvgLoRA
from server.strategies.ffa_lora import FFALoRA
from server.strategies.rank_growth import with_rank_growth

D_IN, D_OUT = 6, 5


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = LoRALinear(nn.Linear(D_IN, D_OUT), LoRAConfig(rank=2, alpha=4.0), "first")
        self.second = LoRALinear(nn.Linear(D_OUT, D_OUT), LoRAConfig(rank=2, alpha=4.0), "second")
        with torch.no_grad():
            for layer in (self.first, self.second):
                layer.lora_B.weight.normal_(0, 0.5)

    def forward(self, x):
        return self.second(self.first(x))


def pair(rng, rank: int, d_out: int = D_OUT, d_in: int = D_IN, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"lora_A.weight": rng.normal(size=(rank, d_in)) * scale,
            "lora_B.weight": rng.normal(size=(d_out, rank)) * scale}


def state(**layers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{name}.{key}": value for name, factors in layers.items() for key, value in factors.items()}


def settings(**overrides) -> GrowthSettings:
    return GrowthSettings(**{**dict(budget=0, per_round=1, ema=0.5, num_rounds=5, start_rank=2, seed=7), **overrides})


def test_a_grown_adapter_gives_the_same_output_and_one_more_rank():
    model = TwoLayers()
    x = torch.randn(3, D_IN)
    expected = model(x)
    arrays = trainable_state(model)
    grown = grow(arrays, ["first"], seed=7, server_round=1)
    assert grown["first.lora_A.weight"].shape == (3, D_IN) and grown["first.lora_B.weight"].shape == (D_OUT, 3)
    assert not grown["first.lora_B.weight"][:, 2].any() and grown["first.lora_A.weight"][2].any()
    assert grown["second.lora_A.weight"] is arrays["second.lora_A.weight"]
    receiver = TwoLayers()
    fit_ranks(receiver, grown)
    load_state(receiver, grown)
    torch.testing.assert_close(receiver(x), expected)  # the new component is B's zero column times a seeded row
    assert receiver.first.scaling == model.first.scaling  # alpha / starting rank: the other ranks keep their scale
    count = sum(p.numel() for p in receiver.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad) + D_IN + D_OUT
    again = grow(arrays, ["first"], seed=7, server_round=1)["first.lora_A.weight"]
    assert np.array_equal(again, grown["first.lora_A.weight"])  # seeded by (seed, layer, round): every rerun
    assert not np.array_equal(grow(arrays, ["first"], seed=7, server_round=2)["first.lora_A.weight"][2],
                              grown["first.lora_A.weight"][2])


def test_incre_lora_grows_the_layers_with_the_highest_smoothed_mean_theta_times_delta():
    rng = np.random.default_rng(0)
    before = state(a=pair(rng, 2), b=pair(rng, 2), c=pair(rng, 2))
    after = {k: v + rng.normal(size=v.shape) * (3.0 if k.startswith("b.") else 0.1) for k, v in before.items()}
    by_hand = {}
    for name in "abc":
        theta = np.concatenate([after[f"{name}.lora_A.weight"].ravel(), after[f"{name}.lora_B.weight"].ravel()])
        start = np.concatenate([before[f"{name}.lora_A.weight"].ravel(), before[f"{name}.lora_B.weight"].ravel()])
        by_hand[name] = float(np.mean(np.abs(theta * (theta - start))))
    assert incre_lora_scores(before, after) == pytest.approx(by_hand)
    layers, carried = plan_growth(RANK_GROWTH["incre_lora"], before, after, {}, settings(), server_round=1)
    assert layers == ["b"] and carried == pytest.approx(by_hand)  # the highest importance; first round: no history
    history = {"a": 10.0, "b": 0.0, "c": 0.0}  # a's earlier rounds: Ī = β Ī + (1 - β) s
    layers, carried = plan_growth(RANK_GROWTH["incre_lora"], before, after, history, settings(per_round=2), 2)
    assert carried["a"] == pytest.approx(0.5 * 10.0 + 0.5 * by_hand["a"])
    assert layers == sorted(carried, key=lambda n: -carried[n])[:2]


def test_tri_adapt_lora_grows_the_layers_over_a_linearly_falling_share_of_the_largest_norm():
    rng = np.random.default_rng(1)
    after = state(a=pair(rng, 2, scale=1.0), b=pair(rng, 2, scale=0.8), c=pair(rng, 2, scale=0.1))
    scores = tri_adapt_scores({}, after)
    for name in "abc":
        dense = after[f"{name}.lora_B.weight"] @ after[f"{name}.lora_A.weight"]
        assert scores[name] == pytest.approx(np.linalg.norm(dense) / math.sqrt(D_OUT * D_IN))
    rule, top = RANK_GROWTH["tri_adapt_lora"], max(scores.values())
    for server_round in (1, 3, 4):  # of 5: threshold (1 - t/5) x max
        layers, _ = plan_growth(rule, after, after, {}, settings(per_round=3), server_round)
        over = sorted((n for n in scores if scores[n] >= (1 - server_round / 5) * top), key=lambda n: -scores[n])
        assert layers == over
    assert plan_growth(rule, after, after, {}, settings(per_round=1), 4)[0] == [max(scores, key=scores.get)]


def test_growth_stops_at_the_budget_the_layer_size_and_the_last_round():
    rng = np.random.default_rng(2)
    after = state(a=pair(rng, 2), b=pair(rng, 5, d_in=5))  # b is 5 x 5 at rank 5: full
    rule = RANK_GROWTH["tri_adapt_lora"]
    assert plan_growth(rule, after, after, {}, settings(per_round=5), 4)[0] == ["a"]  # b cannot grow
    assert plan_growth(rule, after, after, {}, settings(per_round=5, budget=8), 4)[0] == ["a"]
    assert plan_growth(rule, after, after, {}, settings(per_round=5, budget=7), 4)[0] == []  # Σ r = 7 already
    assert plan_growth(rule, after, after, {}, settings(per_round=5), 5)[0] == []  # nothing after the last round
    # budget 0 = twice the starting total: 2 layers at rank 2 -> 8, so one more rank fits
    assert plan_growth(rule, after, after, {}, settings(per_round=5, budget=0), 4)[0] == ["a"]
    assert plan_growth(rule, after, after, {}, settings(per_round=5, start_rank=1), 4)[0] == []  # 0 -> 4 < 7


def strategy(tmp_path, **overrides):
    config = RunConfig(**{**dict(rank_growth="incre_lora", strategy="fedavg_lora", num_rounds=3,
                                 rank_growth_per_round=1, clients_per_round=2, rank=2), **overrides})
    return with_rank_growth(FedAvgLoRA).from_config(config, str(tmp_path)), config


def test_the_server_decides_from_the_aggregate_only_and_a_resumed_server_decides_the_same(tmp_path):
    """Two federations whose replies differ but average to the same adapter get the same grown global: the
    decision reads the broadcast and the aggregate, nothing a single client sent."""
    rng = np.random.default_rng(3)
    start = {**state(a=pair(rng, 2), b=pair(rng, 2)), "classifier.weight": rng.normal(size=(3, D_OUT))}
    offset = {k: rng.normal(size=v.shape) for k, v in start.items()}
    mean = {k: v + rng.normal(size=v.shape) for k, v in start.items()}
    first = [{k: mean[k] + offset[k] for k in start}, {k: mean[k] - offset[k] for k in start}]
    second = [{k: mean[k] + 2 * offset[k] for k in start}, {k: mean[k] - 2 * offset[k] for k in start}]
    grown = []
    for payloads in (first, second):
        server, config = strategy(tmp_path)
        server.global_arrays = dict(start)
        grown.append(server.aggregate_payloads(payloads, [1.0, 1.0], [11, 12], server_round=1))
    assert grown[0].keys() == grown[1].keys() and all(np.allclose(grown[0][k], grown[1][k]) for k in grown[0])
    layers, scores = plan_growth(RANK_GROWTH["incre_lora"], start, weighted_mean(first, [1.0, 1.0]), {},
                                 server.growth, 1)
    expected = grow({**start, **weighted_mean(first, [1.0, 1.0])}, layers, config.seed, 1)
    assert all(np.allclose(grown[1][k], expected[k]) for k in expected) and len(layers) == 1
    assert server.growth_log == [{"round": 1, "layers": layers}] and server.growth_scores == pytest.approx(scores)

    saved, arrays = server.state_dict()
    resumed, _ = strategy(tmp_path)
    resumed.load_state_dict(json.loads(json.dumps(saved)), arrays)  # as the checkpoint's state.json holds it
    assert resumed.growth_scores == pytest.approx(server.growth_scores) and resumed.growth_log == server.growth_log
    later = [{k: v * 1.1 for k, v in grown[1].items()}, {k: v * 0.9 for k, v in grown[1].items()}]
    outs = []
    for s in (server, resumed):
        s.global_arrays = dict(grown[1])
        outs.append(s.aggregate_payloads(later, [1.0, 1.0], [11, 12], server_round=2))
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.parametrize("overrides,fragment", [
    ({"rank-growth": "incre_lora", "rank-growth-scores": "private"},
     "rank-growth-scores = 'private' is refused: IncreLoRA's .* would use their private data outside DP-SGD, "
     "neither noised nor charged"),
    ({"rank-growth-scores": "private", "target-epsilon": math.inf}, "rank-growth-scores = 'private' is refused"),
    ({"rank-growth": "incre_lora", "strategy": "ffa_lora"}, "cannot run with strategy 'ffa_lora'"),
    ({"rank-growth": "incre_lora", "strategy": "fedsa_lora"}, "cannot run with strategy 'fedsa_lora'"),
    ({"rank-growth": "tri_adapt_lora", "strategy": "hetlora"}, "cannot run with strategy 'hetlora'"),
    ({"rank-growth": "incre_lora", "adapter": "nola", "strategy": "fedavg_lora"},
     "appends ranks to a plain LoRA pair B A, and adapter 'nola' trains nola_A, nola_B"),
    ({"rank-growth": "incre_lora", "adapter": "sora", "strategy": "fedavg_lora"}, "adapter 'sora' trains"),
    ({"rank-growth": "incre_lora", "rank-schedule": "dylora"}, "cannot be combined with rank-schedule = 'dylora'"),
    ({"rank-growth": "incre_lora", "lora-init": "pissa", "strategy": "fedavg_lora"},
     "cannot be combined with lora-init = 'pissa'"),
    ({"rank-growth": "incre_lora", "base": "lq_lora"}, "cannot be combined with base = 'lq_lora'"),
    ({"rank-growth": "incre_lora", "store-contributions": True, "strategy": "fedavg_lora"},
     "cannot be combined with store-contributions = true"),
    ({"rank-growth": "grow"}, "rank-growth = 'grow' is invalid: choose one of none, incre_lora, tri_adapt_lora"),
    ({"rank-growth-per-round": 0}, "rank-growth-per-round = 0 is invalid"),
    ({"rank-growth-ema": 1.0}, "rank-growth-ema = 1.0 is invalid"),
])
def test_growth_the_run_cannot_do_is_one_line_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flower(overrides)


def test_the_wrapper_refuses_strategies_whose_clients_cannot_follow_the_shapes():
    with pytest.raises(ConfigError, match="rank growth needs a strategy that sends every client the whole global"):
        with_rank_growth(FFALoRA)
    for ok in ({"rank-growth": "incre_lora"}, {"rank-growth": "tri_adapt_lora", "adapter": "allora",
                                               "strategy": "fedavg_lora"}):
        RunConfig.from_flower(ok)


def test_the_peft_export_of_a_grown_allora_adapter_gives_the_same_logits(tmp_path):
    """Per-layer ranks go out as PEFT's rank_pattern / alpha_pattern; ALLoRA's scale 1 as lora_alpha = r."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.export import adapted_with, export_peft
    from common.model import resolve_model_path

    config = RunConfig.from_flower({"adapter": "allora", "rank": 2, "target-modules": "query",
                                    "strategy": "fedavg_lora", "rank-growth": "incre_lora"})
    arrays = trainable_state(adapted_with(config, {}, ["a", "b", "c"]).model)
    rng = np.random.default_rng(4)
    arrays = {k: (v + rng.normal(size=v.shape) * 0.05).astype(v.dtype) for k, v in arrays.items()}
    layers = sorted({k[: -len(".lora_A.weight")] for k in arrays if k.endswith(".lora_A.weight")})
    grown = grow(grow(arrays, layers[:2], 1, 1), layers[:1], 1, 2)
    grown = {k: (v + rng.normal(size=v.shape) * 0.05).astype(v.dtype) for k, v in grown.items()}  # train the new ranks
    adapted = adapted_with(config, grown, ["a", "b", "c"])
    assert sorted(set(layer_ranks(grown).values())) == [2, 3, 4]
    batch = adapted.tokenizer(["a small furry creature"], return_tensors="pt")
    with torch.no_grad():
        expected = adapted.model(**batch).logits
    export_peft(config, adapted, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (2, 2) and sorted(saved["rank_pattern"].values()) == [3, 4]
    assert sorted(saved["alpha_pattern"].values()) == [3, 4]  # lora_alpha r_ℓ / r: scale 1 everywhere
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(""), num_labels=3)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # 3 DP rounds of 2 clients on the real MiniLM with a restart: ~30 s CPU, more on busy cores
def test_a_federated_run_grows_ranks_between_rounds_and_resumes_with_them(tmp_path, monkeypatch):
    """IncreLoRA on fedavg_lora, 3 rounds, 2 ranks a round; the server dies before round 3 and is started again.
    Every client trains, and the server evaluates, the grown shapes; none grow after the last round; the
    checkpoint carries the scores and the log; the export loads the grown adapter."""
    import client.train_round as train_round
    from safetensors.numpy import load_file

    from common.export import adapted_with
    from tests.conftest import write_toy_csv
    from tests.federation import CrashingFederation, ServerKilled, run_server

    trained: list[dict[str, int]] = []  # each client training's per-layer ranks, in call order
    real_train = train_round.train_locally

    def client_training(model, *args, **kwargs):
        trained.append({name: m.lora_A.out_features for name, m in model.named_modules() if isinstance(m, LoRALinear)})
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(train_round, "train_locally", client_training)

    data = write_toy_csv(tmp_path, per_class=20)
    settings = RunConfig(dataset=str(data), examples_per_class=0, num_rounds=3, clients_per_round=2, local_steps=2,
                         batch_size=8, max_seq_len=12, target_epsilon=8.0, delta=1e-3, rank=2, target_modules="query",
                         strategy="fedavg_lora", partitioner="iid", rank_growth="incre_lora", rank_growth_per_round=2,
                         run_dir=str(tmp_path / "run")).to_flower()
    federation = CrashingFederation(settings, kill_at_round=3)
    with pytest.raises(ServerKilled):
        run_server(federation, settings)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert [entry["round"] for entry in state["strategy"]["rank_growth"]["log"]] == [1, 2]
    federation.kill = False
    run_dir = run_server(federation, settings)

    totals = [sum(ranks.values()) for ranks in trained]
    assert totals == [12, 12, 14, 14, 16, 16]  # 6 query layers at rank 2, then +2 after rounds 1 and 2
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [row.get("rank-total") for row in rows] == [None, 14, 16, 16]
    assert all(0.0 <= row["global-accuracy"] <= 1.0 for row in rows)  # the server evaluated every grown global
    final = load_file(str(run_dir / "adapter.safetensors"))
    assert sum(layer_ranks(final).values()) == 16 and max(layer_ranks(final).values()) <= 4
    config = RunConfig.from_flower(settings)
    exported = adapted_with(config, final, ["a", "b", "c"])
    assert {name: m.lora_A.out_features for name, m in exported.model.named_modules()
            if isinstance(m, LoRALinear)} == layer_ranks(final)
    for client in ("0", "1"):
        ledger = json.loads((run_dir / "ledgers" / f"client-{client}.json").read_text())
        assert [row["round"] for row in ledger["history"]] == [1, 2, 3]
