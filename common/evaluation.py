"""Loss and accuracy of a classifier on a dataset (used by clients and by the server)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.tensors import trim


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.to(device)
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for input_ids, attention_mask, labels in DataLoader(data, batch_size=batch_size):
        input_ids, attention_mask = trim(input_ids, attention_mask)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        labels = labels.to(device)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
        count += len(labels)
    model.train(was_training)
    return total_loss / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def per_example_losses(model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device) -> np.ndarray:
    """The cross-entropy of every example, in order (the privacy audit's membership scores)."""
    was_training = model.training
    model.to(device)
    model.eval()
    losses = []
    for input_ids, attention_mask, labels in DataLoader(data, batch_size=batch_size):
        input_ids, attention_mask = trim(input_ids, attention_mask)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        losses.append(F.cross_entropy(logits.float(), labels.to(device), reduction="none").cpu().numpy())
    model.train(was_training)
    return np.concatenate(losses) if losses else np.zeros(0)
