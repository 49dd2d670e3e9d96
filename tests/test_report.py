"""The privacy report: built from ledgers, epsilon recomputed from history, CLI re-checks a run dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant

from server.report import REPORT_JSON, build_report, render_markdown, write_report
from tests.conftest import REPO

HISTORY = [
    {"round": 1, "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 50},
    {"round": 2, "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 50},
    {"round": 3, "noise_multiplier": 0.9, "sample_rate": 0.04, "steps": 20},
]


def opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in history]
    return accountant.get_epsilon(delta=delta)


def sample_report():
    ledgers = {
        "10": {"history": HISTORY[:1]},
        "2": {"history": HISTORY},
        "3": {"history": []},
    }
    return build_report(ledgers, delta=1e-5, accountant="rdp", target_epsilon=8.0,
                        run={"strategy": "fedsvd", "rounds": 3, "model": "m", "dataset": "d"})


def test_report_follows_the_documented_shape_and_recomputes_epsilon():
    report = sample_report()
    assert set(report) == {"delta", "accountant", "level", "clients", "run", "faults"}
    assert report["faults"] == []
    assert report["level"] == "sample" and report["accountant"] == "rdp"
    assert [c["id"] for c in report["clients"]] == ["2", "3", "10"]
    two = report["clients"][0]
    assert set(two) == {"id", "target_epsilon", "epsilon", "history"}
    assert two["history"] == HISTORY
    assert abs(two["epsilon"] - opacus_epsilon(HISTORY, 1e-5)) < 1e-9
    assert report["clients"][1]["epsilon"] is None  # never trained privately


def test_markdown_lists_every_client():
    text = render_markdown(sample_report())
    for client_id in ("2", "3", "10"):
        assert f"| {client_id} |" in text
    assert "sample-level" in text and "rdp" in text


def test_cli_recomputes_and_fixes_a_tampered_epsilon(tmp_path):
    report = sample_report()
    report["clients"][0]["epsilon"] = 0.5  # a claim that does not match the history
    (tmp_path / REPORT_JSON).write_text(json.dumps(report))
    result = subprocess.run([sys.executable, "-m", "server.report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "recorded epsilon 0.5 != recomputed" in result.stdout
    fixed = json.loads((tmp_path / REPORT_JSON).read_text())
    assert abs(fixed["clients"][0]["epsilon"] - opacus_epsilon(HISTORY, 1e-5)) < 1e-9
    assert (tmp_path / "privacy.md").exists() and (tmp_path / "privacy_epsilon.png").stat().st_size > 1000


def test_cli_on_a_directory_without_report_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "server.report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "privacy.json not found" in result.stderr


@pytest.mark.parametrize("damage", [
    lambda r: r["clients"][0]["history"][0].pop("steps"),
    lambda r: r["clients"][0]["history"][0].update(sample_rate="0.1"),
    lambda r: r.pop("delta"),
], ids=["row-missing-steps", "rate-is-a-string", "no-delta"])
def test_cli_on_a_damaged_report_is_one_line(tmp_path, damage):
    report = sample_report()
    damage(report)
    (tmp_path / REPORT_JSON).write_text(json.dumps(report))
    result = subprocess.run([sys.executable, "-m", "server.report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "not a valid privacy report" in result.stderr


def test_write_report_creates_all_files(tmp_path):
    path = write_report(tmp_path, sample_report())
    assert path.name == "privacy.md"
    assert {p.name for p in tmp_path.iterdir()} == {"privacy.json", "privacy.md", "privacy.html", "privacy_epsilon.png",
                                                    "privacy_budget.png", "privacy_noise.png"}
