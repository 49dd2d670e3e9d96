"""The privacy report lists every fault: which client, which round, what happened, what the server did."""

from __future__ import annotations

import json

import pytest

from server.report import REPORT_JSON, build_report, describe_fault, render_markdown, write_report

pytestmark = pytest.mark.faults
FAULTS = [
    {"round": 2, "node": 17, "client": "3", "kind": "malformed-reply", "reason": "classifier.weight contains NaN or Inf",
     "action": "reply rejected"},
    {"round": 2, "node": 18, "client": None, "kind": "error-reply", "reason": "crashed | badly",
     "action": "no update from this node this round"},
    {"round": 3, "node": None, "client": None, "kind": "round-skipped", "reason": "1 valid replies, min-train-clients = 2",
     "action": "round skipped; global adapter unchanged"},
]


def report(faults):
    history = [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}]
    return build_report({"3": {"history": history}}, delta=1e-5, accountant="rdp", target_epsilon=8.0,
                        run={"strategy": "fedsvd", "rounds": 3, "model": "m", "dataset": "d"}, faults=faults)


def test_faults_are_in_the_json_and_a_markdown_table(tmp_path):
    write_report(tmp_path, report(FAULTS))
    assert json.loads((tmp_path / REPORT_JSON).read_text())["faults"] == FAULTS
    text = (tmp_path / "privacy.md").read_text()
    assert "## Faults (3)" in text
    assert "| 2 | 3 | 17 | malformed-reply | classifier.weight contains NaN or Inf | reply rejected |" in text
    assert "| 2 | - | 18 | error-reply | crashed \\| badly | no update from this node this round |" in text
    assert "| 3 | - | - | round-skipped | 1 valid replies, min-train-clients = 2 |" in text


def test_a_run_without_faults_says_so_and_an_old_report_says_it_did_not_record_them():
    assert "## Faults (0)\n\nNone: every reply was valid and every sampled node answered." in render_markdown(report([]))
    old = report([])
    del old["faults"]
    assert "## Faults (not recorded)" in render_markdown(old)


def test_one_line_per_fault_for_the_run_log():
    assert [describe_fault(f) for f in FAULTS] == [
        "round 2, client 3 (node 17): malformed-reply: classifier.weight contains NaN or Inf -> reply rejected",
        "round 2 (node 18): error-reply: crashed | badly -> no update from this node this round",
        "round 3: round-skipped: 1 valid replies, min-train-clients = 2 -> round skipped; global adapter unchanged",
    ]
