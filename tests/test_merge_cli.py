"""`python -m server.merge`: the end-of-training merge of the clients' own adapters of a finished run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

from common.config import RunConfig
from server.merge import merge_adapters
from tests.conftest import REPO

LAYER = "bert.encoder.layer.0.attention.self.query"
A, B, HEAD = f"{LAYER}.lora_A.weight", f"{LAYER}.lora_B.weight", "classifier.weight"


def client(rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {A: rng.normal(size=(rank, 12)), B: rng.normal(size=(10, rank)), HEAD: rng.normal(size=(3, 12))}


def fake_run(tmp_path, ranks=(2, 3), examples=(10, 30)):
    (tmp_path / "clients").mkdir(parents=True)
    for k, (rank, n) in enumerate(zip(ranks, examples)):
        save_file(client(rank, k), str(tmp_path / "clients" / f"client-{k}.safetensors"),
                  metadata={"num-examples": str(float(n))})
    (tmp_path / "run_config.json").write_text(json.dumps(RunConfig.from_flower({"rank": 4, "alpha": 8.0}).to_flower()))
    (tmp_path / "labels.json").write_text('["a", "b", "c"]')
    return tmp_path


def test_merge_at_full_rank_is_the_example_weighted_mean_of_products_and_heads():
    c0, c1 = client(2, 0), client(3, 1)
    for method in ("lego", "flexlora"):
        out = merge_adapters([c0, c1], [10, 30], method, rank=5)
        np.testing.assert_allclose(out[B] @ out[A], 0.25 * c0[B] @ c0[A] + 0.75 * c1[B] @ c1[A], atol=1e-9)
        np.testing.assert_allclose(out[HEAD], 0.25 * c0[HEAD] + 0.75 * c1[HEAD])


def test_cli_writes_an_exportable_run_directory_with_the_merged_rank(tmp_path):
    run = fake_run(tmp_path)
    result = subprocess.run([sys.executable, "-m", "server.merge", str(run), "--method", "flexlora", "--rank", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = run / "merged-flexlora"
    merged = load_file(str(out / "adapter.safetensors"))
    assert merged[A].shape == (3, 12) and merged[B].shape == (10, 3)
    config = RunConfig.from_flower(json.loads((out / "run_config.json").read_text()))
    assert config.rank == 3 and config.alpha / config.rank == 8.0 / 4  # the run's scale alpha / r_max is kept
    assert json.loads((out / "labels.json").read_text()) == ["a", "b", "c"]


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "server.merge", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    run = fake_run(tmp_path / "r")
    result = subprocess.run([sys.executable, "-m", "server.merge", str(run), "--rank", "40"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: rank 40 exceeds layer" in result.stderr and "Traceback" not in result.stderr
