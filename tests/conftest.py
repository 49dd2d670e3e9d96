"""Shared test helpers."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet/data.noun")

needs_wordnet = pytest.mark.skipif(not WORDNET.exists(), reason="WordNet data (apt-get install wordnet-base) missing")


def write_toy_csv(directory: Path, per_class: int = 40) -> Path:
    """A tiny 3-class labelled text file (`per_class` rows per class) for tests that run the real model."""
    words = {"animal": "a small furry creature", "tool": "a metal device used to cut", "food": "a sweet dish eaten"}
    lines = ["text,label"] + [f"{text} number {i},{label}" for label, text in words.items() for i in range(per_class)]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "toy.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo_ok(num_clients: int, *run_configs: str) -> subprocess.CompletedProcess:
    """`python -m simulations.demo` (a real `flwr run` simulation); fails the test with the log tail."""
    command = [sys.executable, "-m", "simulations.demo", "--num-clients", str(num_clients)]
    for settings in run_configs:
        command += ["--run-config", settings]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def server_log(caplog):
    """fedlora's loggers do not propagate to the root logger (common/logs.py): attach pytest's handler to
    the server's, so a test can assert the exact log lines the server wrote."""
    logger = logging.getLogger("fedlora.server")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
