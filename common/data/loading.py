"""One entry point for every dataset name: a registry, not an if-chain."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

from common.config import RunConfig
from common.data.dataset import TextDataset
from common.data.files import load_labeled_file
from common.data.wordnet import load_wordnet

NAMED_DATASETS: dict[str, Callable[[], TextDataset]] = {"wordnet": load_wordnet}


def load_dataset(config: RunConfig) -> TextDataset:
    """The dataset a run config names, capped per class (seeded)."""
    return _load_cached(config.dataset, config.text_column, config.label_column, config.labels,
                        config.examples_per_class, config.seed)


@lru_cache(maxsize=4)
def _load_cached(dataset: str, text_column: str, label_column: str, labels: str, cap: int,
                 seed: int) -> TextDataset:
    if dataset in NAMED_DATASETS:
        full = NAMED_DATASETS[dataset]()
    else:
        full = load_labeled_file(Path(dataset).expanduser(), text_column, label_column, labels)
    return full.cap_per_class(cap, seed)
