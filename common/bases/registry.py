"""Which frozen base a run trains on (run config `base`): name -> what is done to the loaded model.

A base acts in two places of `common.model._template`, once per process on the model template:
`prune` before the adapters are injected (LoRAM's structured pruning: the adapters then get the pruned
shapes) and `compress` after (quantization: an adapter's own base layer is quantized too). Every step
is a deterministic function of the pretrained weights and the run config (the pruning score reads no
data), so every party that builds the model from the same run config gets the same base, and its
checksum (`common.bases.checksum`) lets the server refuse a client whose base differs.

What the server serves and exports (`served`):
- "fp32", "nf4": W0 + s B A on the full-precision weights (QLoRA's convention: B starts at 0, so the
  adapter is a pure update of W0);
- "lq_lora" (with or without `base-init = "eora"`), and "nf4" with `base-init = "eora"`: deq(Q) + s B A,
  the model that was trained (the adapter started as a compensation of Q's error; adding it to W0 would
  count that error twice);
- "loram", "qloram": the full unpruned W0 + s B A with B, A recovered from the pruned space (zeros at
  pruned positions, `common.bases.pruning.recover_arrays`); "qloram" with `base-init = "eora"`: W0 + the
  recovered trained change s (B A - B0 A0) only, B0 A0 being EoRA's start (`common.bases.eora_init`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from common.config import BASES, RunConfig
from common.errors import ConfigError

# The adapters a base's init or recovery is defined for: LoRA's W0 + s B A. Others train on nf4 as on fp32.
LORA_ONLY = ("lq_lora", "loram", "qloram")


def _nothing(model: nn.Module, config: RunConfig) -> None:
    """The pretrained weights as loaded."""


def _nf4(model: nn.Module, config: RunConfig) -> None:
    """QLoRA's base: every frozen backbone linear in NF4 (blocks of 64, 8-bit double-quantized scales),
    the classifier head and the adapter factors in full precision."""
    from common.bases.replace import quantize_frozen_base

    quantize_frozen_base(model)


def _lq_lora(model: nn.Module, config: RunConfig) -> None:
    """LQ-LoRA: Q + L1 L2 per LoRA layer (L1, L2 start the adapter), NF4 or the ILP's mix elsewhere;
    Fisher-weighted on the public split with `lq-fisher = "public"` (every party recomputes it)."""
    from common.bases.lq_lora_model import apply_lq_lora, public_fisher

    fisher = public_fisher(model, config) if config.lq_fisher == "public" else None
    apply_lq_lora(model, config.rank, budget=config.lq_bits, iters=config.lq_iters, fisher=fisher)


def _prune(model: nn.Module, config: RunConfig):
    """LoRAM: `prune-ratio` of every layer's MLP channels and attention heads removed (data-free L2 score)."""
    from common.bases.pruning import prune_bert

    pruned = prune_bert(model, config.prune_ratio)
    if not pruned.index_maps:
        raise ConfigError(f"base = {config.base!r} prunes BERT-style layers (attention.self + intermediate), and "
                          "the model has none; use base = 'fp32' or 'nf4' for this model")
    return pruned


@dataclass(frozen=True)
class BaseKind:
    """How one base is built, and what the server evaluates and exports for it."""

    compress: Callable[[nn.Module, RunConfig], None]  # after adapter injection, in place
    prune: Callable | None = None  # before injection: model -> common.bases.pruning.PrunedModel
    quantized: bool = False  # frozen linears are QuantizedLinear (no weight to fold an update into)


BASE_KINDS: dict[str, BaseKind] = {
    "fp32": BaseKind(compress=_nothing),
    "nf4": BaseKind(compress=_nf4, quantized=True),
    "lq_lora": BaseKind(compress=_lq_lora, quantized=True),
    "loram": BaseKind(compress=_nothing, prune=_prune),
    "qloram": BaseKind(compress=_nf4, prune=_prune, quantized=True),
}
assert set(BASE_KINDS) == set(BASES), "common.config.BASES must list exactly the bases built here"


def get_base(name: str) -> BaseKind:
    if name not in BASE_KINDS:
        raise ConfigError(f"base = {name!r} is unknown; choose one of {', '.join(BASE_KINDS)}")
    return BASE_KINDS[name]


def serves_compressed(config: RunConfig) -> bool:
    """Is the served model deq(Q) + s B A (the adapter started as a compensation of Q's error)?

    Not for "qloram" with EoRA: that one serves the full W0 plus the recovered trained change
    (`common.bases.eora_init.trained_change`), since W0 has no NF4 error to compensate.
    """
    return config.base == "lq_lora" or (config.base == "nf4" and config.base_init == "eora")


def check_base(config: RunConfig) -> None:
    """What a base needs of the adapter (the registry-free checks are in RunConfig.validate)."""
    get_base(config.base)
    needs_lora = config.base in LORA_ONLY or config.base_init == "eora"
    if needs_lora and config.adapter != "lora":
        what = f"base-init = 'eora'" if config.base_init == "eora" else f"base = {config.base!r}"
        raise ConfigError(f"{what} needs adapter = 'lora' (its init / recovery is defined for W0 + s B A), not "
                          f"{config.adapter!r}: set adapter = 'lora' or base = 'fp32' / 'nf4'")


def check_base_strategy(config: RunConfig, strategy: type) -> None:
    """What a base needs of the aggregation strategy (`strategy`: a server.strategies class)."""
    if get_base(config.base).quantized and getattr(strategy, "fold_global", False):
        raise ConfigError(f"strategy {config.strategy!r} folds the global LoRA into the base weights every round, "
                          f"and base = {config.base!r} stores them quantized (folding would need re-quantization): "
                          f"use base = 'fp32' or 'loram', or another strategy")
    if config.base == "lq_lora" and getattr(strategy, "rank_heterogeneous", False):
        raise ConfigError(f"base = 'lq_lora' decomposes W0 at the run's rank, so every client needs that rank; "
                          f"{config.strategy!r} is rank-heterogeneous: use fedsvd, ffa_lora or fedavg_lora")
    if config.base_init == "eora" and "lora_A" in getattr(strategy, "static_factors", ()):
        raise ConfigError(f"base-init = 'eora' sets A from the server's calibration, but strategy "
                          f"{config.strategy!r} rebuilds A from the seed on every client: use fedsvd or fedavg_lora")


def prune_base(config: RunConfig, model: nn.Module):
    """(the model the adapters go into, LoRAM's index maps or None): before adapter injection."""
    kind = get_base(config.base)
    if kind.prune is None:
        return model, None
    pruned = kind.prune(model, config)
    return pruned.model, pruned.index_maps


def apply_base(config: RunConfig, model: nn.Module) -> None:
    """After adapter injection: quantize / decompose the frozen base in place."""
    try:
        get_base(config.base).compress(model, config)
    except ValueError as err:  # e.g. a rank above a matrix's smaller side in LQ-LoRA's decomposition
        raise ConfigError(f"base = {config.base!r}: {err}") from None
