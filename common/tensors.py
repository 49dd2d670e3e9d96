"""Text to model inputs, and batches trimmed to their longest sequence."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from common.data.dataset import TextDataset


def encode(tokenizer, data: TextDataset, max_seq_len: int) -> TensorDataset:
    """(input_ids, attention_mask, labels), padded to `max_seq_len` and truncated there."""
    batch = tokenizer(
        data.texts, padding="max_length", truncation=True, max_length=max_seq_len, return_tensors="pt"
    )
    labels = torch.tensor(data.labels, dtype=torch.long)
    return TensorDataset(batch["input_ids"], batch["attention_mask"], labels)


def trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns that no example in the batch uses (short texts train ~2x faster)."""
    if attention_mask.numel() == 0:
        return input_ids, attention_mask
    length = max(1, int(attention_mask.sum(dim=1).max()))
    return input_ids[:, :length], attention_mask[:, :length]
