"""Labeled text datasets: loading (WordNet or a user's file), splitting and partitioning."""

from common.data.dataset import TextDataset
from common.data.loading import load_dataset

__all__ = ["TextDataset", "load_dataset"]
