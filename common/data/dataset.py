"""The in-memory form every loader produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; `label_names[i]` is the name of label i."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "TextDataset":
        indices = [int(i) for i in indices]
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
            source=self.source,
        )

    def cap_per_class(self, cap: int, seed: int) -> "TextDataset":
        """At most `cap` examples per class, chosen with a seeded shuffle (0 = keep all)."""
        if cap <= 0:
            return self
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.labels)
        keep: list[int] = []
        for label in range(len(self.label_names)):
            members = np.flatnonzero(labels == label)
            keep.extend(rng.permutation(members)[:cap].tolist())
        return self.subset(sorted(keep))
