"""LoRA initializers (`lora-init`): PiSSA's and LoRA-GA's closed forms, the residual base W0 - s B0 A0 in a
layer and a model, the refusals, the privacy report's init row, and (slow) one in-process federated LoRA-GA
run in which the clients, the server's evaluation (also after a resume) and the export share one residual."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from common.adapters.lora import LoRAConfig, LoRALinear, start_from_gradient, trained_from_start
from common.adapters.lora_inits import STABLE_GAMMA, lora_ga_start, pissa_start
from common.adapters.registry import gradient_init_of, private_init_steps
from common.config import RunConfig
from common.data.partition import uses_public_split
from common.errors import ConfigError
from common.payload import load_state
from common.privacy import PrivacyStep, epsilon_of
from common.privacy.plan import check_privacy_plan
from server.report import build_report, render_markdown
from server.report_html import render_html
from server.strategies import check_compatible


def spectrum_matrix(d_out: int, d_in: int, seed: int) -> np.ndarray:
    """A matrix with well-separated singular values 1, 0.8, 0.64, ... (so every SVD picks the same subspaces)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(d_out, d_out)))
    v, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    k = min(d_out, d_in)
    return (u[:, :k] * 0.8 ** np.arange(k)) @ v[:, :k].T


def test_pissa_start_is_the_best_rank_r_approximation_of_w0():
    w0, rank, scaling = spectrum_matrix(10, 12, seed=0), 3, 16.0 / 3
    b0, a0 = (t.double().numpy() for t in pissa_start(torch.from_numpy(w0).float(), rank, scaling))
    u, s, vh = np.linalg.svd(w0)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    np.testing.assert_allclose(scaling * b0 @ a0, best, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(b0, axis=0), np.linalg.norm(a0, axis=1), rtol=1e-5)  # √(σ/s) each side
    residual = w0 - scaling * b0 @ a0  # what the layer trains on: the tail of the spectrum
    np.testing.assert_allclose(np.linalg.svd(residual, compute_uv=False)[:9 - rank], s[rank:9], atol=1e-6)
    np.testing.assert_allclose(residual + scaling * b0 @ a0, w0, atol=1e-6)


def test_lora_ga_start_is_the_cards_formula_from_the_gradients_svd():
    """A0 = c V[:, :r]ᵀ, B0 = c U[:, r:2r], c = d_out^(1/4)/√16 (numpy's SVD, signs as `truncated_svd` fixes
    them), and the first LoRA step then follows the best rank-2r approximation of G (card 36's check)."""
    d_out, d_in, rank = 10, 12, 2
    gradient = spectrum_matrix(d_out, d_in, seed=1)
    b0, a0 = (t.double().numpy() for t in lora_ga_start(torch.from_numpy(gradient).float(), rank))
    u, s, vh = np.linalg.svd(gradient)
    signs = np.sign(vh[np.arange(2 * rank), np.abs(vh[:2 * rank]).argmax(axis=1)])  # v_i's largest entry > 0
    u, vh = u[:, :2 * rank] * signs, vh[:2 * rank] * signs[:, None]
    c = d_out ** 0.25 / np.sqrt(STABLE_GAMMA)
    np.testing.assert_allclose(a0, c * vh[:rank], atol=1e-6)
    np.testing.assert_allclose(b0, c * u[:, rank:2 * rank], atol=1e-6)
    best_2r = (u * s[:2 * rank]) @ vh
    np.testing.assert_allclose(b0 @ b0.T @ gradient + gradient @ a0.T @ a0, c ** 2 * best_2r, atol=1e-6)


def started_layer(init: str) -> tuple[LoRALinear, torch.Tensor]:
    """A 10 x 12 LoRA layer of `init` (LoRA-GA's start loaded as the server sends it) and the base's W0."""
    base = nn.Linear(12, 10)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(spectrum_matrix(10, 12, seed=2)).float())
    w0 = base.weight.detach().clone()
    config = LoRAConfig(rank=2, alpha=6.0, init=init)
    layer = LoRALinear(base, config, "query")
    if init == "lora_ga":  # the server's broadcast: the frozen start, and B, A at it
        gradient = torch.randn(10, 12, generator=torch.Generator().manual_seed(3))
        frozen = {f"layer.{k}": v.numpy() for k, v in start_from_gradient(gradient, config).items()}
        load_state(nn.ModuleDict({"layer": layer}), {**frozen, **trained_from_start(frozen)})
    return layer, w0


@pytest.mark.parametrize("init", ["pissa", "lora_ga"])
def test_a_started_layer_keeps_the_base_output_and_merges_only_the_change_of_w0(init):
    layer, w0 = started_layer(init)
    s, b0, a0 = layer.scaling, layer.lora_init_B.weight.detach(), layer.lora_init_A.weight.detach()
    assert b0.abs().sum() > 0 and not b0.requires_grad and not a0.requires_grad
    assert torch.equal(layer.lora_B.weight, b0) and torch.equal(layer.lora_A.weight, a0)  # B A starts at B0 A0
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), layer.base(x), atol=1e-6, rtol=0)  # the model is W0 at the start
    assert torch.equal(layer.delta_weight(), torch.zeros_like(w0))
    with torch.no_grad():  # a trained step: the served weight is the residual base plus s B A
        layer.lora_B.weight.add_(0.1 * torch.randn_like(b0))
        layer.lora_A.weight.add_(0.1 * torch.randn_like(a0))
    trained = layer(x)
    residual = w0 - s * b0 @ a0
    expected = residual + s * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    layer.merge()
    torch.testing.assert_close(layer.base.weight.detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), trained, atol=1e-5, rtol=0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_a_default_layer_has_no_start_factors():
    layer = LoRALinear(nn.Linear(12, 10), LoRAConfig(rank=2), "query")
    assert not layer.has_start and {n for n, _ in layer.named_parameters()} == {
        "base.weight", "base.bias", "lora_A.weight", "lora_B.weight"}


def test_lora_ga_needs_two_rank_singular_vectors_per_layer():
    with pytest.raises(ConfigError, match=r"takes 2 x rank singular vectors .* layer q is 10 x 12: use rank <= 5"):
        LoRALinear(nn.Linear(12, 10), LoRAConfig(rank=6, init="lora_ga"), "q")


def test_the_pissa_model_is_the_base_model_and_every_party_rebuilds_the_same_residual():
    """PiSSA is data-free: a party that builds the model afresh (another process: the export, a client) gets a
    bit-identical start, and the logits at init are those of W0 (the adapter and its start set to 0)."""
    from common import model as model_module
    from common.export import adapted_with
    from common.model import build_model
    from common.payload import trainable_state

    config = RunConfig.from_flower({"lora-init": "pissa", "rank": 4, "strategy": "fedavg_lora"})
    client = build_model(config, num_labels=3)
    model_module._template.cache_clear()  # rebuild from the pretrained weights, as another process would
    served = adapted_with(config, trainable_state(client.model), ["a", "b", "c"])
    layers = [(n, m) for n, m in client.model.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 12 and gradient_init_of(config) is None and private_init_steps(config) == 0
    for name, layer in layers:
        other = served.model.get_submodule(name)
        assert torch.equal(layer.lora_init_B.weight, other.lora_init_B.weight)
        assert torch.equal(layer.lora_init_A.weight, other.lora_init_A.weight)
        assert torch.equal(layer.lora_B.weight, layer.lora_init_B.weight) and layer.lora_B.weight.abs().sum() > 0
    batch = client.tokenizer(["a small furry creature", "a metal device used to cut"], padding=True,
                             return_tensors="pt")
    with torch.no_grad():
        ours = client.model.eval()(**batch).logits
        for _, layer in layers:  # what remains is W0 and the head
            layer.lora_B.weight.zero_()
            layer.lora_init_B.weight.zero_()
        base = client.model(**batch).logits
    torch.testing.assert_close(ours, base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings, message", [
    ({"adapter": "dora"}, r"adapter 'dora' has no such pair: use adapter = 'lora' or lora-init = 'default'"),
    ({"adapter": "lora_sb"}, "its frozen bases have their own data-driven init, see init-data"),
    ({"base": "nf4"}, r"cannot start on base = 'nf4' \(the gradient init reads the full-precision W0.*use base = "
                      "'fp32' with base-init = 'none'"),
    ({"base": "lq_lora"}, "cannot start on base = 'lq_lora' .LQ-LoRA's decomposition sets the LoRA start itself"),
    ({"base": "nf4", "base-init": "eora"}, "cannot start on base-init = 'eora' .EoRA sets the LoRA start itself"),
    ({"rank-schedule": "dylora"}, "rank-schedule = 'dylora' masks and rescales the trained ranks"),
    ({"client-ranks": "2,4", "strategy": "hetlora"}, "every client needs that rank: use client-ranks"),
    ({"lora-init": "pisa"}, "lora-init = 'pisa' is invalid: choose default"),
])
def test_a_lora_init_the_run_cannot_train_is_one_line_before_anything_runs(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({"lora-init": "lora_ga", "strategy": "fedavg_lora", **settings})


def test_pissa_starts_on_nf4_and_lora_ga_only_on_full_precision():
    RunConfig.from_flower({"lora-init": "pissa", "base": "nf4"})
    with pytest.raises(ConfigError, match="base = 'nf4'"):
        RunConfig.from_flower({"lora-init": "lora_ga", "base": "nf4"})


@pytest.mark.parametrize("strategy, init, ok", [
    ("fedavg_lora", "lora_ga", True), ("fedsvd", "lora_ga", True), ("ffa_lora", "lora_ga", False),
    ("fedsa_lora", "lora_ga", False), ("hetlora", "lora_ga", False), ("ffa_lora", "pissa", True),
    ("fedsa_lora", "pissa", True), ("flora", "pissa", False),
])
def test_strategies_that_cannot_bring_the_start_to_every_client_are_refused(strategy, init, ok):
    if ok:
        check_compatible(strategy, "lora", (), init)
        return
    with pytest.raises(ConfigError, match=rf"lora-init = '{init}' .*\(strategy '{strategy}'\): use strategy "
                                          r"'fedavg_lora' or"):
        check_compatible(strategy, "lora", (), init)


def test_lora_ga_reads_data_where_init_data_says():
    public = RunConfig.from_flower({"lora-init": "lora_ga", "strategy": "fedavg_lora"})
    private = dataclasses.replace(public, init_data="private")
    assert gradient_init_of(public) is start_from_gradient and uses_public_split(public)
    assert private_init_steps(public) == 0 and private_init_steps(private) == 1 and not uses_public_split(private)


def test_a_private_lora_ga_init_without_budget_for_its_step_is_refused_before_training():
    """"No public split and no budget": init-data = "private" at a fixed noise multiplier whose one init step
    already spends more than target-epsilon; a public split, or a calibrated noise (it counts the step), is fine."""
    no_budget = RunConfig.from_flower({"lora-init": "lora_ga", "strategy": "fedavg_lora", "init-data": "private",
                                       "noise-multiplier": 0.5, "target-epsilon": 1.0, "batch-size": 16})
    with pytest.raises(ConfigError, match=r"init-data = 'private' has no budget for the lora_ga init: its one DP "
                                          r"step .* spends epsilon [0-9.]+ > target-epsilon = 1 .*use init-data = "
                                          r"'public' \(the server's public split, no privacy cost\)"):
        check_privacy_plan(no_budget, 100)
    check_privacy_plan(dataclasses.replace(no_budget, init_data="public"), 100)
    check_privacy_plan(dataclasses.replace(no_budget, noise_multiplier=0.0), 100)
    check_privacy_plan(dataclasses.replace(no_budget, noise_multiplier=5.0), 100)  # that step fits


INIT_ROW = {"round": 0, "noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 1}
TRAIN_ROW = {"round": 1, "noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 10}


def init_report(data: str) -> dict:
    history = [INIT_ROW, TRAIN_ROW] if data == "private" else [TRAIN_ROW]
    return build_report({"0": {"history": history}, "1": {"history": history}}, delta=1e-5, accountant="rdp",
                        target_epsilon=8.0, run={"strategy": "fedavg_lora", "rounds": 1, "model": "m",
                                                 "dataset": "d", "init": {"name": "lora_ga", "data": data}})


def test_the_privacy_report_shows_the_init_step_as_its_own_row():
    report = init_report("private")
    cost = epsilon_of([PrivacyStep.from_dict(INIT_ROW)], 1e-5)
    assert 0 < cost < report["clients"][0]["epsilon"]
    markdown = render_markdown(report)
    assert "## Adapter init (round 0)" in markdown and "charged to its ledger as round 0" in markdown
    for client in ("0", "1"):
        assert f"| lora_ga | {client} | 1 | 0.900 | 0.1000 | {cost:.3f} |" in markdown
    html = render_html(report, [], [])
    assert '<table id="init">' in html and f'<td class="num">{cost:.3f}</td>' in html


@pytest.mark.parametrize("data, row", [("public", "| lora_ga | server | - | - | - | 0 (the server's public split) |"),
                                       ("none", "| lora_ga | every party | - | - | - | 0 (computed from the "
                                                "pretrained weights) |")])
def test_a_free_init_has_its_row_with_no_cost(data, row):
    markdown = render_markdown(init_report(data))
    assert row in markdown and "no privacy cost" in markdown


def test_a_damaged_init_entry_is_a_report_shape_error():
    from server.report import check_report_shape

    report = init_report("private")
    report["run"]["init"] = "lora_ga"
    with pytest.raises(ValueError, match="run.init must be null or an object with name and data"):
        check_report_shape(report)


def test_a_run_without_an_init_has_no_init_section():
    report = build_report({"0": {"history": [TRAIN_ROW]}}, delta=1e-5, accountant="rdp", target_epsilon=8.0,
                          run={"strategy": "fedsvd", "rounds": 1, "init": None})
    assert "Adapter init" not in render_markdown(report) and "Adapter init" not in render_html(report, [], [])


def test_the_peft_export_of_a_started_lora_is_a_rank_2r_lora_on_w0(tmp_path):
    """PEFT's base is W0: the trained pair goes out as s [B, -B0] [A; A0] (r -> 2r, alpha -> 2 alpha)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.export import adapted_with, export_peft
    from common.model import resolve_model_path

    config = RunConfig.from_flower({"lora-init": "pissa", "rank": 2, "target-modules": "query",
                                    "strategy": "fedavg_lora"})
    adapted = adapted_with(config, {}, ["a", "b", "c"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    batch = adapted.tokenizer(["a small furry creature"], return_tensors="pt")
    with torch.no_grad():
        expected = adapted.model(**batch).logits
    export_peft(config, adapted, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (4, 2 * config.alpha)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(""), num_labels=3)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_merging_the_clients_adapters_keeps_the_runs_start_and_rank(tmp_path):
    from safetensors.numpy import save_file

    from common.errors import FedloraError
    from server.merge import start_of_run

    start = {"q.lora_init_A.weight": np.ones((2, 3), np.float32), "q.lora_init_B.weight": np.ones((4, 2), np.float32)}
    save_file({**start, "q.lora_A.weight": np.zeros((2, 3), np.float32)}, str(tmp_path / "adapter.safetensors"))
    config = RunConfig(rank=2, lora_init="lora_ga", strategy="fedavg_lora")
    assert set(start_of_run(tmp_path, config, 2)) == set(start)
    with pytest.raises(FedloraError, match=r"--rank 3: lora-init = 'lora_ga' trained every client on the base "
                                           r"W0 - s B0 A0 of rank 2; merge at --rank 2"):
        start_of_run(tmp_path, config, 3)


def residual_bases(model: nn.Module) -> dict[str, torch.Tensor]:
    """W0 - s B0 A0 of every started LoRA layer: the base its factors train on."""
    return {name: (m.base.weight - m.scaling * m.lora_init_B.weight @ m.lora_init_A.weight).detach().clone()
            for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.has_start}


@pytest.mark.slow  # a private init round, 2 DP rounds and a restart on the real MiniLM: ~25 s CPU, 70 s on 2 busy cores
def test_clients_server_resume_and_export_share_lora_gas_residual_base(tmp_path, monkeypatch):
    """LoRA-GA on the clients' data (DP round 0), fedavg_lora, 2 rounds; the server dies after round 1's
    checkpoint and is started again. Every model that trains or is evaluated, and the export, has the same
    residual base W0 - s B0 A0; round 1 starts at W0; the ledgers hold rounds 0, 1, 2; the report a row for 0."""
    import client.train_round as train_round
    import server.server_app as server_app
    from safetensors.numpy import load_file

    from common.export import adapted_with
    from tests.conftest import write_toy_csv
    from tests.federation import CrashingFederation, ServerKilled, run_server

    seen: list[tuple[str, dict, torch.Tensor]] = []  # (who, residual bases, first layer's ΔW), in call order

    def record(who: str, model: nn.Module) -> None:
        first = next(m for m in model.modules() if isinstance(m, LoRALinear))
        seen.append((who, residual_bases(model), first.delta_weight().detach().clone()))

    real_train, real_evaluate = train_round.train_locally, server_app.evaluate

    def client_training(model, *args, **kwargs):
        record("client", model)
        return real_train(model, *args, **kwargs)

    def server_evaluation(model, *args, **kwargs):
        record("server", model)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train_round, "train_locally", client_training)
    monkeypatch.setattr(server_app, "evaluate", server_evaluation)

    data = write_toy_csv(tmp_path, per_class=20)
    settings = RunConfig(dataset=str(data), examples_per_class=0, num_rounds=2, clients_per_round=2, local_steps=1,
                         batch_size=8, max_seq_len=12, target_epsilon=8.0, rank=2, target_modules="query",
                         strategy="fedavg_lora", lora_init="lora_ga", init_data="private", partitioner="iid",
                         run_dir=str(tmp_path / "run")).to_flower()
    federation = CrashingFederation(settings, kill_at_round=2)
    with pytest.raises(ServerKilled):
        run_server(federation, settings)
    federation.kill = False
    run_dir = run_server(federation, settings)

    config = RunConfig.from_flower(settings)
    exported = adapted_with(config, load_file(str(run_dir / "adapter.safetensors")), ["a", "b", "c"])
    reference = residual_bases(exported.model)
    assert len(reference) == 6 and all(m.lora_init_B.weight.abs().sum() > 0 for m in exported.model.modules()
                                       if isinstance(m, LoRALinear))
    # server evaluates round 0, clients train round 1, server evaluates it | restart | round 2 the same
    assert [who for who, *_ in seen] == ["server", "client", "client", "server", "client", "client", "server"]
    for who, bases, _ in seen:
        assert bases.keys() == reference.keys() and all(torch.equal(bases[k], reference[k]) for k in bases), who
    first_round = [delta for who, _, delta in seen[1:3]]
    assert all(torch.equal(delta, torch.zeros_like(delta)) for delta in first_round)  # B A = B0 A0: W0 at start
    assert [f["kind"] for f in json.loads((run_dir / "metrics.json").read_text())["faults"]] == ["server-restart"]
    for client in ("0", "1"):
        ledger = json.loads((run_dir / "ledgers" / f"client-{client}.json").read_text())
        assert [row["round"] for row in ledger["history"]] == [0, 1, 2]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["run"]["init"] == {"name": "lora_ga", "data": "private"}
    markdown = (run_dir / "privacy.md").read_text()
    for client in privacy["clients"]:
        cost = epsilon_of([PrivacyStep.from_dict(r) for r in client["history"] if r["round"] == 0], config.delta)
        assert f"| lora_ga | {client['id']} | 1 |" in markdown and f"| {cost:.3f} |" in markdown
