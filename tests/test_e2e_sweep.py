"""A real sweep as a user runs it: `python -m simulations.sweep` (one DP cell of 2 simulated clients and the
centralized reference, real `flwr run` simulations), then the same command again (nothing reruns), then
`python -m simulations.plot_sweep`. Slow: about 4 minutes on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_toy_csv

pytestmark = pytest.mark.slow


def test_sweep_runs_resumes_and_plots(tmp_path):
    data = write_toy_csv(tmp_path / "data", per_class=40)
    results = tmp_path / "out" / "tiny.jsonl"
    sweep = tmp_path / "tiny.toml"
    sweep.write_text(f"""
[sweep]
num-clients = 2
reference = true
results = "{results}"

[sweep.fixed]
dataset = "{data}"
examples-per-class = 0
num-rounds = 1
clients-per-round = 2
local-steps = 2
batch-size = 16
max-seq-len = 16

[sweep.grid]
target-epsilon = [8.0]
seed = [0]
""")
    command = [sys.executable, "-m", "simulations.sweep", str(sweep)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "sweep: 2 cells ok, 0 failed this time" in first.stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["federated", "reference"] and all(r["status"] == "ok" for r in rows)
    federated, reference = rows
    assert set(federated["epsilon"]) == {"0", "1"} and 0 < federated["epsilon_max"] <= 8.0
    assert federated["delta"] == 1e-5 and reference["epsilon_max"] is None
    assert len(federated["rounds"]) == 2 and federated["bytes_up"] > 0 and federated["bytes_down"] > 0
    assert federated["peak_rss_mib"] > 100 and 0 <= federated["accuracy"] <= 1
    assert isinstance(federated["intruders_total"], int)

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 cells, 2 finished before, 0 to run" in again.stdout, again.stdout

    plots = subprocess.run([sys.executable, "-m", "simulations.plot_sweep", str(results)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert plots.returncode == 0, plots.stderr[-3000:]
    figures = results.with_name("tiny-figures")
    assert {p.name for p in figures.iterdir()} == {"accuracy_vs_epsilon.png", "accuracy_vs_bytes.png", "rounds.png",
                                                   "summary.md"}
    assert "Centralized non-private LoRA on the pooled data" in (figures / "summary.md").read_text()
