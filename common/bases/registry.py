"""Which frozen base a run trains on (run config `base`): name -> what is done to the loaded model.

Each entry runs once per process on the model template, after the adapters are injected, so every
party that builds the model from the same run config gets the same base (NF4 quantization is a
deterministic function of the pretrained weights). Export and merging always use the full-precision
base ("fp32"): the server's product is the full-size model with the trained adapter folded in.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.config import BASES
from common.errors import ConfigError


def _fp32(model: nn.Module) -> None:
    """The pretrained weights as loaded."""


def _nf4(model: nn.Module) -> None:
    """QLoRA's base: every frozen backbone linear in NF4 (blocks of 64, 8-bit double-quantized scales),
    the classifier head and the adapter factors in full precision."""
    from common.bases.replace import quantize_frozen_base

    quantize_frozen_base(model)


BASE_BUILDERS: dict[str, Callable[[nn.Module], None]] = {"fp32": _fp32, "nf4": _nf4}
assert set(BASE_BUILDERS) == set(BASES), "common.config.BASES must list exactly the bases built here"


def apply_base(name: str, model: nn.Module) -> None:
    if name not in BASE_BUILDERS:
        raise ConfigError(f"base = {name!r} is unknown; choose one of {', '.join(BASE_BUILDERS)}")
    BASE_BUILDERS[name](model)
