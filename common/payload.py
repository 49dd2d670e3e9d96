"""Adapter tensors in and out of a model, as the named numpy arrays Flower records carry."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.errors import FedloraError


class PayloadError(FedloraError):
    """A received payload does not fit the local model (unknown key, wrong shape)."""


def trainable_state(model: nn.Module, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Current values of `keys` (default: every trainable parameter), detached, on the CPU."""
    params = dict(model.named_parameters())
    wanted = keys if keys is not None else [n for n, p in params.items() if p.requires_grad]
    return {name: params[name].detach().cpu().numpy().copy() for name in wanted}


def load_state(model: nn.Module, arrays: dict[str, np.ndarray], leading_block: bool = False) -> None:
    """Copy `arrays` into the model's parameters of the same name; every key must exist and fit.

    With `leading_block`, a smaller array fills the leading block of the parameter and the rest keeps its
    value: a client whose rank is above the global r_max loads the r_max prefix and keeps its own init.
    """
    params = dict(model.named_parameters())
    for name, value in arrays.items():
        if name not in params:
            raise PayloadError(f"payload key {name!r} is not a parameter of the local model")
        target = params[name]
        fits = tuple(target.shape) == tuple(value.shape) or (
            leading_block and value.ndim == target.ndim and all(v <= t for v, t in zip(value.shape, target.shape)))
        if not fits:
            raise PayloadError(f"payload {name!r} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
        with torch.no_grad():
            block = target[tuple(slice(0, n) for n in value.shape)]
            block.copy_(torch.as_tensor(np.asarray(value), dtype=target.dtype))


def to_record(arrays: dict[str, np.ndarray]):
    """Named numpy arrays as a Flower ArrayRecord (order preserved)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def record_nbytes(record) -> int:
    """The float bytes an ArrayRecord carries (each array's shape x item size, read from its header, not decoded)."""
    return sum(int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize for array in record.values())


def from_record(record) -> dict[str, np.ndarray]:
    """A Flower ArrayRecord as named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}
