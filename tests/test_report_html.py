"""The privacy report's HTML page and plots: key numbers, escaping, self-contained, regenerated from
privacy.json alone, rendered by headless Chromium; ledgers missing trained rounds stop the report."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import pytest

from common.errors import FedloraError
from server.report import REPORT_HTML, REPORT_JSON, REPORT_MD, build_report, check_ledgers_cover, write_report
from server.report import main as report_command
from server.report_plots import AUDIT_PNG, BUDGET_PNG, EPSILON_PNG, NOISE_PNG
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE_ID = "<script>alert(1)</script>"
HISTORY = [{"round": r, "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 50} for r in (1, 2, 3)]
FAULTS = [
    {"round": 2, "node": 17, "client": "1", "kind": "malformed-reply",
     "reason": "classifier.weight contains NaN <img src=x onerror=alert(2)>", "action": "reply rejected"},
    {"round": 3, "node": None, "client": None, "kind": "round-skipped",
     "reason": "1 valid replies, min-train-clients = 2", "action": "round skipped; global adapter unchanged"},
]
AUDIT = {"canaries": 1000, "guesses": 200, "correct": 130, "epsilon_lower_bound": 0.41, "confidence": 0.95}
USER_LEVEL = {"clip_norm": 0.5, "noise_multiplier": 0.9, "sample_rate": 0.25, "population": 8, "denominator": 2,
              "delta": 1e-3, "target_epsilon": 4.0, "accountant": "rdp",
              "history": [{"round": r, "noise_multiplier": 0.9, "sample_rate": 0.25, "steps": 1} for r in (1, 2, 3)]}
ALL_FILES = {REPORT_JSON, REPORT_MD, REPORT_HTML, EPSILON_PNG, BUDGET_PNG, NOISE_PNG, AUDIT_PNG}


def make_report(audit: bool = True, **kwargs) -> dict:
    ledgers = {"0": {"history": HISTORY}, "1": {"history": HISTORY[:2]}, "3": {"history": []},
               HOSTILE_ID: {"history": HISTORY[:1]}}
    report = build_report(ledgers, delta=1e-5, accountant="rdp", target_epsilon=2.0, faults=FAULTS,
                          run={"strategy": "fedsvd", "rounds": 3, "model": "m", "dataset": "wordnet"}, **kwargs)
    if audit:
        report["clients"][0]["audit"] = dict(AUDIT)
    return report


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    report = make_report()
    write_report(run_dir, report)
    return run_dir, report, (run_dir / REPORT_HTML).read_text()


def key_numbers(report: dict) -> list[str]:
    return [f"{c['epsilon']:.3f}" for c in report["clients"] if c["epsilon"] is not None]


def test_html_has_every_key_number_and_the_faults(written):
    _, report, html = written
    for eps in key_numbers(report):
        assert f">{eps}<" in html
    assert len(key_numbers(report)) == 3
    assert '<span id="delta">1e-05</span>' in html and "<code>rdp</code>" in html and "Sample-level" in html
    assert ">0.370<" in html  # budget remaining of client 0: 2.0 - 1.630
    assert "<h2>Faults (2)</h2>" in html
    assert "malformed-reply" in html and "round-skipped" in html and "min-train-clients = 2" in html


def test_client_ids_and_fault_reasons_are_escaped(written):
    _, _, html = written
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html


def test_the_page_is_self_contained_and_embeds_every_plot(written):
    run_dir, _, html = written
    assert not re.search(r"https?://", html) and "<link" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {(run_dir / name).read_bytes() for name in (EPSILON_PNG, BUDGET_PNG, NOISE_PNG, AUDIT_PNG)}


def test_every_plot_is_a_png(written):
    run_dir, _, _ = written
    assert {p.name for p in run_dir.iterdir()} == ALL_FILES
    for name in (EPSILON_PNG, BUDGET_PNG, NOISE_PNG, AUDIT_PNG):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name


def test_the_audit_bound_sits_next_to_the_epsilon_and_a_bound_above_it_is_flagged(written, tmp_path):
    _, _, html = written
    row = next(r for r in html.split("<tr>") if r.startswith("<td>0</td>"))
    assert ">1.630<" in row and ">0.410<br>" in row and "130 of 200 guesses right" in row
    assert "(above the reported ε)" not in html
    report = make_report()
    report["clients"][0]["audit"]["epsilon_lower_bound"] = 2.5  # more leakage than the accountant allows
    write_report(tmp_path, report)
    assert '<td class="audit bad">2.500 (above the reported ε)' in (tmp_path / REPORT_HTML).read_text()
    assert "| 2.500 (95% confidence, 130/200 right) |" in (tmp_path / REPORT_MD).read_text()


def test_without_audits_there_is_no_audit_column_or_plot(tmp_path):
    (tmp_path / AUDIT_PNG).write_bytes(b"stale")
    write_report(tmp_path, make_report(audit=False))
    html = (tmp_path / REPORT_HTML).read_text()
    assert "audit lower bound" not in html.lower() and 'class="audit' not in html
    assert {p.name for p in tmp_path.iterdir()} == ALL_FILES - {AUDIT_PNG}
    assert html.count('src="data:image/png') == 3


def test_a_client_id_with_dollar_signs_does_not_break_the_plots(tmp_path):
    history = {"history": HISTORY[:1]}
    report = build_report({"$\\frac{$": history, "_hidden": history}, delta=1e-5, accountant="rdp",
                          target_epsilon=8.0, run={})
    report["clients"][0]["audit"] = dict(AUDIT)
    write_report(tmp_path, report)
    assert "$\\frac{$" in (tmp_path / REPORT_HTML).read_text()


def test_the_report_command_regenerates_everything_from_privacy_json_alone(written, tmp_path):
    run_dir, report, _ = written
    shutil.copy(run_dir / REPORT_JSON, tmp_path / REPORT_JSON)
    result = subprocess.run([sys.executable, "-m", "server.report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in tmp_path.iterdir()} == ALL_FILES
    for name in ALL_FILES - {REPORT_JSON}:  # the same page and plots as the run wrote, byte for byte
        assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert json.loads((tmp_path / REPORT_JSON).read_text()) == report


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_page(written, tmp_path):
    run_dir, report, _ = written
    url = (run_dir / REPORT_HTML).as_uri()
    common = ["chromium", "--headless=new", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "privacy.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", url], capture_output=True, timeout=60)
    assert shot.is_file() and shot.read_bytes().startswith(PNG_SIGNATURE) and shot.stat().st_size > 20_000
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    for eps in key_numbers(report):
        assert f">{eps}<" in dom
    for client_id in ("0", "1", "3"):
        assert f"<td>{client_id}</td>" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and '<span id="delta">1e-05</span>' in dom
    both = make_report(user_level=USER_LEVEL)  # both guarantees on one page
    write_report(tmp_path / "both", both)
    dom = subprocess.run([*common, "--dump-dom", (tmp_path / "both" / REPORT_HTML).as_uri()], capture_output=True,
                         text=True, timeout=60).stdout
    assert f'<strong id="user-epsilon">{both["user_level"]["epsilon"]:.3f}</strong>' in dom
    assert "Two guarantees" in dom and all(f">{eps}<" in dom for eps in key_numbers(both))


def test_a_ledger_missing_trained_rounds_names_the_client_rounds_and_count():
    report = make_report(audit=False)
    with pytest.raises(FedloraError, match=r"client 3: .* round\(s\) 1, 2;"):  # a target but not one row
        check_ledgers_cover(report, {"3": [1, 2]})
    report["clients"][2]["target_epsilon"] = None
    check_ledgers_cover(report, {"0": [1, 2, 3], "1": [1, 2], "3": [1, 2]})  # 3 trained without DP: no rows
    with pytest.raises(FedloraError, match=r"client 1: .* no row for trained round\(s\) 3, 4; .*\(2 of the 4 rounds"):
        check_ledgers_cover(report, {"0": [1, 2, 3], "1": [1, 2, 3, 4]})
    with pytest.raises(FedloraError, match=r"client 9 trained 2 round\(s\) \(1, 2\) but the privacy report has no "
                                           r"ledger"):
        check_ledgers_cover(report, {"9": [1, 2]})


def test_build_report_keeps_the_trained_rounds_and_refuses_a_ledger_without_them(tmp_path, capsys):
    report = make_report(audit=False, trained_rounds={"0": [3, 1, 2], "1": [1, 2]})
    assert report["clients"][0]["trained_rounds"] == [1, 2, 3]
    assert report["clients"][2]["trained_rounds"] == []
    with pytest.raises(FedloraError, match="client 0: .* round\\(s\\) 4;"):
        make_report(trained_rounds={"0": [1, 2, 3, 4]})
    report["clients"][1]["trained_rounds"].append(3)  # a privacy.json whose ledger lost a row: the command refuses
    (tmp_path / REPORT_JSON).write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_code:
        report_command([str(tmp_path)])
    assert exit_code.value.code == 2
    assert re.fullmatch(r"error: client 1: .* round\(s\) 3;.*\(1 of the 3 rounds.*\n", capsys.readouterr().err)
    assert {p.name for p in tmp_path.iterdir()} == {REPORT_JSON}


def test_metrics_counting_more_dp_clients_than_ledger_rows_stops_the_report(tmp_path):
    rounds = [{"round": 0}, {"round": 1, "clients-trained": 3, "epsilon-max": 1.3},
              {"round": 2, "clients-trained": 2, "epsilon-max": 1.5},
              {"round": 3, "clients-trained": 2, "epsilon-max": 1.6}]  # only client 0's ledger has round 3
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    with pytest.raises(FedloraError, match=r"round 3: 2 client\(s\) trained with DP \(metrics.json\) but only 1 "
                                           r"privacy ledger\(s\) have a row for it: 1 ledger row\(s\) missing "
                                           r"\(clients without one: 1, 3, <script>"):
        write_report(tmp_path, make_report())
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.json"}
    rounds[3]["epsilon-max"] = float("inf")  # a client trained without DP: it has no rows to miss
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    write_report(tmp_path, make_report())
