"""How LoRA's pair B A starts (run config `lora-init`): a registry of initializers, and what each one needs.

- "default": A ~ Kaiming-uniform from the seed, B = 0 (Hu et al., `LoRALinear.reset_parameters`).
- "pissa" (PiSSA, the init BA-LoRA uses; METHODS.md card 32): B0 A0 from the top-r SVD of W0, so that
  s B0 A0 is W0's best rank-r approximation. Data-free and deterministic (float64 SVD on the CPU, signs
  fixed: `truncated_svd`), so every party rebuilds it from W0 and nothing travels.
- "lora_ga" (LoRA-GA, card 36): A0 = c V[:, :r]ᵀ, B0 = c U[:, r:2r] from the SVD of each layer's full-weight
  gradient G, c = d_out^(1/4) / √γ (γ = 16), so the first LoRA step follows the best rank-2r approximation
  of G. It reads data, so it runs where `init-data` says, through LoRA-SB's machinery
  (`common/gradient_init.py`, `server/adapter_init.py`): the server's public split (no privacy cost), or one
  DP-SGD step on each client, charged to its ledger as round 0. The server computes B0, A0 once and sends
  them with the global state every round (clients never send them back).

Both keep the model's function at the start: the layer holds B0, A0 frozen and computes W0 x − s B0 A0 x +
s B A x, i.e. it trains on the residual base W0 − s B0 A0 (a frozen low-rank path, so a quantized W0
needs no re-quantization), and ΔW = s (B A − B0 A0) is the change from W0 that merging and export fold in.

Decision (card 36 "unsure"): the factors follow the card and the LoRA-GA authors' code (both scaled by c,
exact SVD). PEFT 0.21's `lora_ga` differs: its B also carries the singular values S[r:2r] and A is unscaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from common.adapters.decompositions import truncated_svd
from common.config import LORA_INITS as LORA_INIT_NAMES
from common.errors import ConfigError

STABLE_GAMMA = 16.0  # LoRA-GA's `stable_gamma` (card 36 and PEFT's default)
LORA_FACTORS = ("lora_A", "lora_B")


def pissa_start(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) = (U_r √(Σ_r/s), √(Σ_r/s) V_rᵀ): s B0 A0 is the best rank-r approximation of W0 (PEFT's PiSSA)."""
    u, sigma, vh = truncated_svd(weight, rank)
    root = torch.sqrt(sigma / scaling)
    return u * root, root[:, None] * vh


def lora_ga_start(gradient: torch.Tensor, rank: int, gamma: float = STABLE_GAMMA
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) = (c U[:, r:2r], c V[:, :r]ᵀ) of G's SVD, c = d_out^(1/4) / √γ (direction ArB2r, scale stable)."""
    u, _, vh = truncated_svd(gradient, 2 * rank)
    c = gradient.shape[0] ** 0.25 / math.sqrt(gamma)
    return c * u[:, rank:2 * rank], c * vh[:rank]


@dataclass(frozen=True)
class LoRAInit:
    """Where one init takes LoRA's start (B0, A0) from; neither: LoRA's own (B = 0, no residual base)."""

    # (W0, rank, scaling s) -> (B0, A0): data-free, computed by every party when it builds the model
    from_weight: Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]] | None = None
    # (a layer's full-weight gradient G, rank) -> (B0, A0): reads data, computed once by the server
    from_gradient: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    bases: tuple[str, ...] = ()  # the frozen bases (run config `base`) it can start on; () = any
    summary: str = ""

    @property
    def offsets_base(self) -> bool:
        """Does the layer train on the residual base W0 − s B0 A0 (a frozen start path beside W0)?"""
        return self.from_weight is not None or self.from_gradient is not None


LORA_INITS: dict[str, LoRAInit] = {
    "default": LoRAInit(summary="A ~ Kaiming-uniform from the seed, B = 0: training starts at W0"),
    "pissa": LoRAInit(from_weight=pissa_start, bases=("fp32", "nf4"),
                      summary="PiSSA: B0 A0 = W0's top-r singular triplets (data-free), base W0 - s B0 A0"),
    # the gradient is of the full-precision W0 (train_base_weights_only), which a quantized base no longer has
    "lora_ga": LoRAInit(from_gradient=lora_ga_start, bases=("fp32",),
                        summary="LoRA-GA: A0, B0 from the SVD of the full-weight gradient (public split or DP "
                                "round 0), base W0 - s B0 A0"),
}
assert set(LORA_INITS) == set(LORA_INIT_NAMES), "common.config.LORA_INITS must list exactly the inits built here"

# Why a base cannot take an init's start (for the refusal's message)
BASE_CLASHES = {
    "nf4": "the gradient init reads the full-precision W0, which nf4 stores quantized",
    "lq_lora": "LQ-LoRA's decomposition sets the LoRA start itself",
    "loram": "the served model is the unpruned W0, on which a pruned-space start does not exist",
    "qloram": "the served model is the unpruned W0, on which a pruned-space start does not exist",
    "eora": "EoRA sets the LoRA start itself",
}


def get_lora_init(name: str) -> LoRAInit:
    if name not in LORA_INITS:
        raise ConfigError(f"lora-init = {name!r} is unknown; choose one of {', '.join(LORA_INITS)}")
    return LORA_INITS[name]


def check_lora_init(config) -> None:
    """What a non-default `lora-init` needs of the run config (`RunConfig.validate`, so every party stops
    before anything is read); what it needs of the strategy is `strategy_problem`."""
    init = get_lora_init(config.lora_init)
    if not init.offsets_base:
        return
    from common.adapters.registry import ADAPTERS  # the adapter registry imports this module

    takes = sorted(name for name, kind in ADAPTERS.items() if kind.takes_lora_init)
    if config.adapter not in takes:
        own = (" (its frozen bases have their own data-driven init, see init-data)"
               if ADAPTERS.get(config.adapter) and ADAPTERS[config.adapter].gradient_init else "")
        raise ConfigError(f"lora-init = {config.lora_init!r} sets how LoRA's pair B A starts, and adapter "
                          f"{config.adapter!r} has no such pair{own}: use adapter = {' or '.join(map(repr, takes))} "
                          "or lora-init = 'default'")
    if config.base not in init.bases or config.base_init != "none":
        clash = "eora" if config.base_init != "none" else config.base
        what = f"base-init = {config.base_init!r}" if config.base_init != "none" else f"base = {config.base!r}"
        raise ConfigError(f"lora-init = {config.lora_init!r} cannot start on {what} ({BASE_CLASHES[clash]}): use "
                          f"base = {' or '.join(map(repr, init.bases))} with base-init = 'none', or lora-init = "
                          "'default'")
    if config.rank_schedule != "none":
        raise ConfigError(f"rank-schedule = {config.rank_schedule!r} masks and rescales the trained ranks each step, "
                          f"and lora-init = {config.lora_init!r}'s frozen start s B0 A0 is at the full rank: the model "
                          f"would jump away from W0; use rank-schedule = 'none' or lora-init = 'default'")
    if config.client_ranks:
        raise ConfigError(f"lora-init = {config.lora_init!r} offsets every layer by its rank-{config.rank} start, "
                          "so every client needs that rank: use client-ranks = \"\"")


def strategy_problem(lora_init: str, strategy: type) -> str:
    """Why `strategy` (a server.strategies class) cannot train from this init, or "" if it can."""
    init = get_lora_init(lora_init)
    if not init.offsets_base:
        return ""
    if getattr(strategy, "rank_heterogeneous", False):
        return "offsets every layer's base by its start at the run's rank, and the strategy gives clients other ranks"
    kept = [f for f in LORA_FACTORS if f in (*getattr(strategy, "static_factors", ()),
                                              *getattr(strategy, "personal_factors", ()))]
    if init.from_gradient is not None and kept:
        return (f"starts {' and '.join(LORA_FACTORS)} at the server's gradient init, and the strategy never sends "
                f"{' or '.join(kept)} (the clients would start elsewhere)")
    return ""
