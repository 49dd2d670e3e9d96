"""The audit command's pieces: canaries enter exactly the audited client's data, scoring writes privacy.json's
`audit` entry and regenerates the report; the real training runs (DP off: a large bound; DP on: never above
the reported epsilon) are `slow`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from common.config import RunConfig
from common.data.partition import client_data
from common.errors import ConfigError
from common.model import build_model
from common.payload import trainable_state
from common.privacy.canaries import canary_inclusion, make_canaries, with_canaries
from common.data.dataset import TextDataset
from server.report import build_report, write_report
from simulations.audit import main as audit_main, score_run
from tests.conftest import REPO, write_toy_csv


def test_canaries_are_seeded_random_words_with_labels_in_range():
    names = ["a", "b", "c"]
    first, again, other = make_canaries(50, names, 3), make_canaries(50, names, 3), make_canaries(50, names, 4)
    assert first == again and first.texts != other.texts
    assert len(set(first.texts)) == 50 and all(len(t.split()) == 6 for t in first.texts)
    assert set(first.labels) <= {0, 1, 2} and len(set(first.labels)) == 3
    included = canary_inclusion(400, 3)
    assert 150 < included.sum() < 250 and np.array_equal(included, canary_inclusion(400, 3))


def test_with_canaries_appends_exactly_the_included_ones():
    train = TextDataset(texts=["x", "y"], labels=[0, 1], label_names=["a", "b"], source="t")
    out = with_canaries(train, 30, seed=9)
    keep = np.flatnonzero(canary_inclusion(30, 9))
    canaries = make_canaries(30, ["a", "b"], 9)
    assert out.texts == ["x", "y"] + [canaries.texts[i] for i in keep]
    assert out.labels == [0, 1] + [canaries.labels[i] for i in keep]


def test_only_the_audited_client_trains_on_canaries(tmp_path):
    dataset = str(write_toy_csv(tmp_path))
    plain = RunConfig(dataset=dataset)
    audited = RunConfig(dataset=dataset, audit_canaries=40, audit_client=1)
    included = int(canary_inclusion(40, plain.seed).sum())
    for partition in range(3):
        before, after = client_data(plain, partition, 3), client_data(audited, partition, 3)
        extra = included if partition == 1 else 0
        assert len(after.train) == len(before.train) + extra and after.test == before.test


def fake_run(tmp_path, dataset: str, canaries: int = 20):
    """A finished run's directory whose final adapter is the initial one (nothing learned)."""
    config = RunConfig(dataset=dataset, audit_canaries=canaries, run_dir=str(tmp_path), target_epsilon=4.0)
    run_dir = tmp_path
    labels = ["animal", "food", "tool"]
    (run_dir / "run_config.json").write_text(json.dumps(config.to_flower(), default=str))
    (run_dir / "labels.json").write_text(json.dumps(labels))
    save_file(trainable_state(build_model(config, num_labels=3).model), str(run_dir / "adapter.safetensors"))
    ledgers = {"0": {"history": [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 10}]}}
    report = build_report(ledgers, delta=config.delta, accountant="rdp", target_epsilon=4.0, run={})
    write_report(run_dir, report)
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("audited")
    return fake_run(tmp_path, str(write_toy_csv(tmp_path / "data")))


def test_scoring_writes_the_audit_entry_and_the_audit_plot(finished_run):
    run_dir = finished_run
    result, epsilon = score_run(run_dir, guesses=10)
    report = json.loads((run_dir / "privacy.json").read_text())
    entry = report["clients"][0]["audit"]
    assert set(entry) == {"canaries", "guesses", "correct", "epsilon_lower_bound", "confidence"}
    assert entry["canaries"] == 20 and entry["guesses"] == 10 and entry["confidence"] == 0.95
    assert entry["epsilon_lower_bound"] == 0.0  # an untrained model scores every canary 0: nothing to refute
    assert epsilon == pytest.approx(report["clients"][0]["epsilon"]) and math.isfinite(epsilon)
    assert (run_dir / "privacy_audit.png").is_file()
    assert "audit lower bound" in (run_dir / "privacy.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--guesses", "7"], "--guesses 7 must be even"),
    (["--guesses", "40"], "--guesses 40 must be even and in 2..20"),
    (["--client-id", "9"], "has no client '9'"),
])
def test_bad_scoring_requests_are_clear_errors(finished_run, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        audit_main(["--score", str(finished_run), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_run_without_canaries_cannot_be_scored(tmp_path):
    run_dir = fake_run(tmp_path, str(write_toy_csv(tmp_path / "data")), canaries=0)
    with pytest.raises(ConfigError, match="trained without canaries"):
        score_run(run_dir)


# Small client data (about 145 examples + about 100 canaries) and 90 local steps, so that without DP the
# included canaries are seen about 20 times each: the setting of the README's audit figures.
AUDIT_SETTINGS = "clients-per-round=2 examples-per-class=40 local-steps=30 lr=0.01"


def audit_run(tmp_path, name: str, *settings: str) -> dict:
    import subprocess
    import sys

    run_dir = tmp_path / name
    command = [sys.executable, "-m", "simulations.audit", "--canaries", "200", "--num-clients", "2",
               "--run-config", f'run-dir="{run_dir}" {AUDIT_SETTINGS} ' + " ".join(settings)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run_dir / "privacy.json").read_text())["clients"][0]


@pytest.mark.slow
def test_audit_without_dp_finds_a_large_bound_and_with_dp_stays_below_epsilon(tmp_path):
    off = audit_run(tmp_path, "off", "target-epsilon=inf")
    # Without DP the audit must refute small epsilons: a bound above 1.0 needs about 81 of 100 guesses right,
    # where a model that learned nothing of the canaries gets 50. Measured: 3.0 (about 99 right) and, in a CI
    # run, 1.92 (93 right): the count moves with the run, so the threshold leaves room below both.
    assert off["epsilon"] is None and off["audit"]["epsilon_lower_bound"] > 1.0, off["audit"]
    on = audit_run(tmp_path, "on", "target-epsilon=2.0")
    assert on["audit"]["epsilon_lower_bound"] <= on["epsilon"], (on["audit"], on["epsilon"])
