"""Canaries for the one-run privacy audit (common/privacy/audit.py): m made-up examples, each put into the
audited client's training data with probability 1/2.

A canary is a string of random letter-words with a random label: nothing else in the data predicts its
label, so only training on it can lower its loss, and its loss drop is the membership score. Canaries and
their inclusion are derived from the run seed alone, so the audit command can rebuild them after the run
(the training code never sees which canaries were left out).
"""

from __future__ import annotations

import string

import numpy as np

from common.data.dataset import TextDataset
from common.privacy.audit import include_canaries

WORDS_PER_CANARY = 6
_SEED_OFFSET = 1_000_003  # canary seeds never coincide with the run's other seeded streams


def make_canaries(m: int, label_names: list[str], seed: int) -> TextDataset:
    """m canaries: WORDS_PER_CANARY random lowercase words of 4-8 letters each, labels uniform at random."""
    rng = np.random.default_rng(seed + _SEED_OFFSET)
    letters = np.array(list(string.ascii_lowercase))
    texts = [" ".join("".join(rng.choice(letters, size=rng.integers(4, 9))) for _ in range(WORDS_PER_CANARY))
             for _ in range(m)]
    labels = rng.integers(0, len(label_names), size=m).tolist()
    return TextDataset(texts=texts, labels=labels, label_names=list(label_names), source="canaries")


def canary_inclusion(m: int, seed: int) -> np.ndarray:
    """Which canaries the audited client trains on: each independently with probability 1/2."""
    return include_canaries(m, np.random.default_rng(seed + 2 * _SEED_OFFSET))


def with_canaries(train: TextDataset, m: int, seed: int) -> TextDataset:
    """`train` plus the included canaries (appended; Opacus' Poisson sampling makes the order irrelevant)."""
    canaries = make_canaries(m, train.label_names, seed).subset(np.flatnonzero(canary_inclusion(m, seed)))
    return TextDataset(texts=train.texts + canaries.texts, labels=train.labels + canaries.labels,
                       label_names=train.label_names, source=train.source)
