"""A compressed base in the federated loop: the real ServerApp `run` and the real ClientApp functions,
in-process (no SuperLink), on the real MiniLM with QLoRAM (pruned + NF4). The clients train under DP-SGD
on the pruned base, the server evaluates the recovered full model, reports the base once, and refuses
a reply whose base checksum is not its own (that check is a fast unit test; the run is marked slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from safetensors.numpy import load_file

from common.bases.quantized_linear import QuantizedLinear
from common.config import RunConfig
from common.export import adapted_with
from common.model import build_model
from common.payload import to_record
from server.strategies import STRATEGIES
from tests.conftest import write_toy_csv
from tests.federation import InProcessFederation, run_server


def run_in_process(directory, **settings) -> tuple:
    """One DP round of the real ServerApp `run()` with two real ClientApp nodes; (run dir, run config)."""
    data = write_toy_csv(directory)
    run_config = RunConfig(**{**dict(dataset=str(data), examples_per_class=0, num_rounds=1, clients_per_round=2,
                                     local_steps=2, batch_size=8, max_seq_len=16, target_epsilon=8.0, rank=4,
                                     strategy="fedsvd", base="qloram", prune_ratio=0.5, partitioner="iid",
                                     run_dir=str(directory / "run")), **settings}).to_flower()
    run_dir = run_server(InProcessFederation(run_config), run_config)
    return run_dir, RunConfig.from_flower(run_config)


@pytest.fixture(scope="module")
def qloram_run(tmp_path_factory):
    return run_in_process(tmp_path_factory.mktemp("qloram"))


@pytest.mark.slow  # in-process federated DP rounds on the real MiniLM, with the public split's data-aware bases
@pytest.mark.parametrize("settings", [dict(base="qloram", base_init="eora", public_examples=24),
                                      dict(base="nf4", base_init="eora", public_examples=24),
                                      dict(base="lq_lora", lq_fisher="public", public_examples=24)],
                         ids=["qloram-eora", "nf4-eora", "lq_lora-fisher"])
def test_data_aware_bases_train_a_dp_round_and_export(tmp_path, settings):
    from server.bases import load_start

    run_dir, config = run_in_process(tmp_path, **settings)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["faults"] == [] and metrics["rounds"][1]["clients-trained"] == 2
    assert 0 < metrics["rounds"][1]["epsilon-max"] <= 8.0
    assert metrics["base"]["init"] == settings.get("base_init", "none")
    exported = adapted_with(config, load_file(str(run_dir / "adapter.safetensors")), ["a", "b", "c"],
                            start=load_start(config, run_dir))
    assert not any(isinstance(m, QuantizedLinear) for m in exported.model.modules())


@pytest.mark.slow  # one in-process federated run on the real MiniLM: ~40 s on 2 cores
def test_a_qloram_round_trains_on_the_pruned_base_and_reports_the_recovered_full_model(qloram_run):
    run_dir, config = qloram_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pruned = build_model(config, num_labels=3)
    assert metrics["base"] == {"name": "qloram", "init": "none", "sha256": pruned.base_sha256,
                               "bytes": pruned.base_bytes}
    assert metrics["faults"] == []
    trained = metrics["rounds"][1]
    assert trained["clients-trained"] == 2 and trained["bytes-up"] > 0 and trained["bytes-down"] > 0
    assert 0 < trained["epsilon-max"] <= 8.0
    for row in metrics["rounds"]:  # the run's figures are the full model's; the pruned model's are kept
        assert {"global-accuracy", "global-pruned-accuracy", "global-loss", "global-pruned-loss"} <= set(row)
    final = load_file(str(run_dir / "adapter.safetensors"))  # the global state lives in the pruned space
    query = "bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert final[query].shape == (384 // 2, 4)


@pytest.mark.slow  # one in-process federated run on the real MiniLM: ~40 s on 2 cores
def test_the_export_is_the_full_model_with_the_recovered_adapter(qloram_run):
    run_dir, config = qloram_run
    final = load_file(str(run_dir / "adapter.safetensors"))
    exported = adapted_with(config, final, ["a", "b", "c"])
    model = exported.model
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 1536  # unpruned
    layer = model.bert.encoder.layer[0].attention.self.query
    maps = build_model(config, num_labels=3).index_maps
    rows = maps["bert.encoder.layer.0.attention.self.query"][0]
    b = layer.lora_B.weight.detach()
    assert b.shape == (384, 4) and torch.equal(b[rows], torch.from_numpy(final[layer_key(0, "lora_B")]))
    others = torch.ones(384, dtype=torch.bool)
    others[rows] = False
    assert torch.all(b[others] == 0)


def layer_key(index: int, factor: str) -> str:
    return f"bert.encoder.layer.{index}.attention.self.query.{factor}.weight"


def _reply(checksum: str | None, arrays: dict[str, np.ndarray]) -> RecordDict:
    adapter = {"name": "lora", "rank": 2}
    if checksum is not None:
        adapter["base-sha256"] = checksum
    return RecordDict({
        "arrays": to_record(arrays),
        "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, "first-loss": 2.0, "epsilon": 1.0}),
        "adapter": ConfigRecord(adapter),
    })


@pytest.mark.parametrize("checksum", ("0" * 64, None))
def test_a_reply_trained_on_another_base_is_refused(checksum, tmp_path):
    strategy = STRATEGIES["fedavg_lora"](clients_per_round=1, seed=0, run_dir=str(tmp_path))
    arrays = {layer_key(0, "lora_B"): np.zeros((3, 2), np.float32)}
    strategy.global_arrays = dict(arrays)
    assert strategy._read_reply(_reply(checksum, arrays))[1] == ""  # no base checksum armed: not checked
    strategy.base_checksum = "f" * 64
    payload, problem = strategy._read_reply(_reply(checksum, arrays))
    assert payload == {} and "frozen base with checksum" in problem and "'ffffffffffffffff'" in problem
    assert strategy._read_reply(_reply("f" * 64, arrays))[1] == ""  # the server's own base: accepted
