"""End to end: clients of ranks 2, 4 and 8 in a real `flwr run` simulation with FLoRA (the stacking one:
the rank query, per-rank models, folding the global into the base, a global whose rank grows, export)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_wordnet, run_demo_ok
from tests.test_e2e_simulation import TINY


@pytest.fixture(scope="module")
def flora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("flora")
    settings = TINY.replace('strategy="fedsvd"', 'strategy="flora"').replace("clients-per-round=2",
                                                                             "clients-per-round=3")
    result = run_demo_ok(3, settings, f'rank=8 client-ranks="2,4,8" run-dir="{run_dir}"')
    return run_dir, result


@needs_wordnet
def test_every_client_trained_at_its_rank_and_the_stack_grew(flora_run):
    from safetensors.numpy import load_file

    run_dir, result = flora_run
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients-trained"] for r in rounds[1:]] == [3, 3], "every reply was accepted"
    logs = result.stdout + result.stderr
    assert "client ranks (node id: rank)" in logs and "rejected reply" not in logs
    tensors = load_file(str(run_dir / "adapter.safetensors"))
    a_ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    assert a_ranks == {2 * (2 + 4 + 8)}  # round 1 starts from an empty stack; each round adds Σ r_k
    assert 0.0 <= rounds[-1]["global-accuracy"] <= 1.0


@needs_wordnet
def test_the_grown_global_exports_as_a_merged_model_and_as_peft(flora_run):
    run_dir, _ = flora_run
    result = subprocess.run([sys.executable, "-m", "server.export", str(run_dir), "--peft"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peft_config = json.loads((run_dir / "peft" / "adapter_config.json").read_text())
    assert peft_config["r"] == 28 and peft_config["lora_alpha"] == pytest.approx(16.0 * 28 / 8)
    assert (run_dir / "merged" / "config.json").exists()
