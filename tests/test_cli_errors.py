"""Bad input to the demo command: one `error:` line on stderr, exit code 2, no traceback, nothing started."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_demo(*run_config: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "simulations.demo", "--num-clients", "2"]
    for value in ("clients-per-round=2", *run_config):
        args += ["--run-config", value]
    return subprocess.run([*args, *extra], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0]
    assert "starting a simulation SuperLink" not in result.stdout


@pytest.mark.parametrize("override,fragment", [
    ('strategy="fedprox_lora"', "unknown strategy 'fedprox_lora'; available: fedavg_lora, fedsa_lora, fedsvd, fedsvd_het, "
                                "ffa_lora, flexlora, flora, hetlora, lora_lego"),
    ('client-ranks="4,16"', "client-ranks = '4,16' has a rank above rank = 8"),
    ('client-ranks="4,8"', "client-ranks needs a rank-heterogeneous strategy, and 'fedsvd' is not one"),
    ('strategy="flexlora" adapter="dora"', "strategy 'flexlora' merges adapter(s) lora only, not 'dora'"),
    ("rank=0", "rank = 0 is invalid"),
    ("target-epsilon=-2.0", "target-epsilon = -2.0 is invalid"),
    ('dataset="/nonexistent/data.csv"', "/nonexistent/data.csv: data file not found"),
    ('adapter="loha"', "unknown adapter 'loha'; available: "),
    ('adapter="lora_sb" init-data="both"', "init-data = 'both' is invalid: choose one of public, private"),
    ("clients-per-round=3", "clients-per-round = 3 exceeds --num-clients 2"),
    ("delta=0.01", "delta = 0.01 is not below 1/n"),
    ("target-epsilon=0.05", "target-epsilon = 0.05 cannot be met sensibly: 30 planned DP steps"),
])
def test_bad_setting_is_one_line(override, fragment):
    assert_one_line_error(run_demo(override), fragment)


def test_unknown_label_value_names_file_and_line(tmp_path):
    path = tmp_path / "mail.csv"
    rows = ["text,label"] + [f"message number {i},{'spam' if i % 2 else 'ham'}" for i in range(60)]
    rows.insert(31, "a message with a typo label,spma")
    path.write_text("\n".join(rows) + "\n")
    result = run_demo(f'dataset="{path}" labels="ham,spam"')
    assert_one_line_error(result, f"{path}:32: label 'spma' is not one of the configured labels ham, spam")


def test_unparsable_override_is_one_line():
    assert_one_line_error(run_demo("num-rounds=="), "cannot parse --run-config")
