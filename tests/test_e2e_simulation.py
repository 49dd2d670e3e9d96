"""End to end: the demo command runs a real `flwr run` simulation (2 clients, 2 rounds, tiny settings)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import needs_wordnet, run_demo_ok

TINY = ('num-rounds=2 clients-per-round=2 local-steps=5 batch-size=64 max-seq-len=32 examples-per-class=100 '
        'lr=0.02 target-epsilon=50.0 strategy="fedsvd" partitioner="iid"')


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_demo_ok(2, TINY, f'run-dir="{run_dir}"')
    return run_dir, result


@needs_wordnet
def test_report_exists_with_finite_epsilon_within_target(finished_run):
    run_dir, result = finished_run
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["level"] == "sample" and report["accountant"] == "rdp" and report["delta"] == 1e-5
    assert {c["id"] for c in report["clients"]} == {"0", "1"}
    for client in report["clients"]:
        assert [row["round"] for row in client["history"]] == [1, 2]
        assert all(row["steps"] == 5 for row in client["history"])
        assert math.isfinite(client["epsilon"]) and 0 < client["epsilon"] <= 50.0
    assert (run_dir / "privacy.md").exists() and (run_dir / "privacy_epsilon.png").stat().st_size > 0
    assert "privacy report:" in result.stdout and "epsilon" in result.stdout


@needs_wordnet
def test_loss_went_down(finished_run):
    run_dir, _ = finished_run
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients-trained"] for r in rounds[1:]] == [2, 2]  # every reply was accepted
    assert rounds[-1]["global-loss"] < rounds[0]["global-loss"]
    assert rounds[-1]["train-loss"] < rounds[1]["first-loss"]


@needs_wordnet
def test_final_adapter_is_saved(finished_run):
    from safetensors.numpy import load_file

    run_dir, _ = finished_run
    tensors = load_file(str(run_dir / "adapter.safetensors"))
    assert any(".lora_A." in key for key in tensors) and "classifier.weight" in tensors
