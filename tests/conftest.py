"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet/data.noun")

needs_wordnet = pytest.mark.skipif(not WORDNET.exists(), reason="WordNet data (apt-get install wordnet-base) missing")


def write_toy_csv(directory: Path) -> Path:
    """A tiny 3-class labelled text file (40 rows per class) for tests that run the real model."""
    words = {"animal": "a small furry creature", "tool": "a metal device used to cut", "food": "a sweet dish eaten"}
    lines = ["text,label"] + [f"{text} number {i},{label}" for label, text in words.items() for i in range(40)]
    path = directory / "toy.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
