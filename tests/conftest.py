"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet/data.noun")

needs_wordnet = pytest.mark.skipif(not WORDNET.exists(), reason="WordNet data (apt-get install wordnet-base) missing")
