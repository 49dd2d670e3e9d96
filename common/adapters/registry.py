"""Adapter registry: a run config names an adapter; nothing else in the code base names a method.

Each entry says how to build the adapter from the run config, which of its factors train (and so
travel each round), whether averaging those factors is exactly averaging the clients' ΔW, and the
closed-form trainable parameter count per adapted layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from common.adapters.allora import allora_config, allora_linear
from common.adapters.base import AdapterLayer
from common.adapters.bat import BatConfig, BatLinear, bat_peft_config, bat_trainable_count
from common.adapters.block_lora import BlockLoRAConfig, BlockLoRALinear, block_lora_trainable_count
from common.adapters.bone import BoneConfig, BoneLinear, bone_peft_config, bone_trainable_count
from common.adapters.codyra import CoDyRALinear, codyra_config, codyra_trainable_count
from common.adapters.diffora import diffora_config, diffora_linear, diffora_trainable_count
from common.adapters.dora import DoRALinear, dora_trainable_count
from common.adapters.full import FULL_FACTOR, FullConfig, FullLinear, full_trainable_count
from common.adapters.lora import LoRAConfig, LoRALinear, lora_trainable_count, start_from_gradient
from common.adapters.lora_inits import get_lora_init
from common.adapters.core_basis import core_trainable_count
from common.adapters.lamda import LaMDAConfig, lamda_linear
from common.adapters.lora_xs import LoRAXSConfig, lora_xs_linear
from common.adapters.diagonal_basis import diagonal_trainable_count
from common.adapters.hydra import HydraConfig, HydraLinear, hydra_trainable_count
from common.adapters.lora_sb import LoRASBConfig, bases_from_gradient, lora_sb_linear
from common.adapters.loldu import LoLDUConfig, loldu_linear
from common.adapters.nola import NOLAConfig, NOLALinear, nola_trainable_count
from common.adapters.randlora import (RandLoRAConfig, RandLoRALinear, fill_peft_bases, randlora_peft_config,
                                      randlora_trainable_count)
from common.adapters.salt import SALTConfig, SALTLinear, salt_trainable_count
from common.adapters.sara import SaRAConfig, SaRALinear, sara_trainable_count
from common.adapters.sltrain import SLTrainConfig, SLTrainLinear, sltrain_trainable_count
from common.adapters.smora import SMoRAConfig, SMoRALinear, smora_trainable_count
from common.adapters.sora import SoRALinear, sora_trainable_count
from common.adapters.svfit import SVFitConfig, svfit_linear
from common.adapters.transformed_lora import (TransformedLoRAConfig, TransformedLoRALinear,
                                              transformed_lora_trainable_count)
from common.adapters.wara import WaRAConfig, WaRALinear, wara_trainable_count
from common.config import RunConfig
from common.errors import ConfigError


@dataclass(frozen=True)
class AdapterKind:
    """How to build one adapter family from the run config and wrap a base `nn.Linear` with it."""

    make_config: Callable[[RunConfig], object]
    wrap: Callable[[nn.Linear, object, str], AdapterLayer]
    trainable_factors: tuple[str, ...]  # trainable sub-modules, e.g. ("lora_A", "lora_B")
    exact_averaging: bool  # mean of the trained factors == mean of the clients' ΔW
    trainable_count: Callable[[int, int, object], int]  # (d_out, d_in, adapter config) -> parameters
    # (run config, head module names) -> the equivalent PEFT config, or None where PEFT has no such method
    peft_config: Callable[[RunConfig, list[str]], object] | None = None
    # (run config, PEFT model) -> None: before saving, fill the PEFT model's frozen tensors that fedlora
    # rebuilds from the seed (RandLoRA's random bases), so the saved adapter holds exactly ours
    peft_frozen: Callable[[RunConfig, nn.Module], None] | None = None
    # Adapters whose frozen factors come from data: (a layer's summed full-weight gradient, adapter config)
    # -> the layer's frozen factor values. Run once before round 1 (run config `init-data` says on whose
    # data); the server then sends those factors with the global state and never expects them back.
    gradient_init: Callable[[torch.Tensor, object], dict[str, torch.Tensor]] | None = None
    # Opacus grad-sample mode for DP-SGD: "hooks" where every trainable module has a registered sampler,
    # "functorch" for math Opacus cannot hook (slower; none of ours needs it yet)
    grad_sample_mode: str = "hooks"
    # Each rank is its own unit (SMoRA: one expert per rank, picked by a router): strategies that re-factor
    # B A by an SVD (`reorders_ranks`, FedSVD) would rotate the ranks under the router, so they refuse it
    rank_identity_matters: bool = False
    # What a rank is to the adapter, for that refusal's message ("each rank of adapter X <this>")
    rank_identity_reason: str = ""
    # The adapter chooses its adapted modules from data before the run (DiffoRA): the server's public
    # split is carved out of the clients' data for it (`init-data = "public"`)
    selects_modules: bool = False
    # The adapter is LoRA's W0 + s B A and run config `lora-init` chooses how B A starts
    # (`common/adapters/lora_inits.py`: PiSSA from W0, LoRA-GA from a gradient, through `gradient_init_of`)
    takes_lora_init: bool = False


def lora_peft_config(config: RunConfig, heads: list[str], use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_module_names), modules_to_save=heads, bias="none",
                      use_dora=use_dora)


def lora_config(c: RunConfig, init: str = "default") -> LoRAConfig:
    return LoRAConfig(rank=c.rank, alpha=c.alpha, dropout=c.lora_dropout, target_modules=c.target_module_names,
                      seed=c.seed, init=init)


ADAPTERS: dict[str, AdapterKind] = {
    "lora": AdapterKind(
        make_config=lambda c: lora_config(c, init=c.lora_init),
        wrap=LoRALinear,
        trainable_factors=("lora_A", "lora_B"),
        exact_averaging=False,  # mean(B) mean(A) != mean(B A); FFA-LoRA and FedSVD train B only
        trainable_count=lora_trainable_count,
        peft_config=lora_peft_config,
        takes_lora_init=True,
    ),
    "dora": AdapterKind(
        make_config=lora_config,
        wrap=DoRALinear,
        trainable_factors=("lora_A", "lora_B", "lora_magnitude_vector"),
        exact_averaging=False,  # the row norm makes ΔW nonlinear in all three factors
        trainable_count=dora_trainable_count,
        peft_config=lambda c, heads: lora_peft_config(c, heads, use_dora=True),
    ),
    "lora_xs": AdapterKind(
        make_config=lambda c: LoRAXSConfig(rank=c.rank, alpha=c.alpha, target_modules=c.target_module_names),
        wrap=lora_xs_linear,
        trainable_factors=("lora_R",),
        exact_averaging=True,
        trainable_count=core_trainable_count,
    ),
    "lamda": AdapterKind(
        make_config=lambda c: LaMDAConfig(rank=c.rank, alpha=c.alpha, target_modules=c.target_module_names),
        wrap=lamda_linear,
        trainable_factors=("lora_R",),
        exact_averaging=True,
        trainable_count=core_trainable_count,
    ),
    "svfit": AdapterKind(
        make_config=lambda c: SVFitConfig(rank=c.rank, target_modules=c.target_module_names),
        wrap=svfit_linear,
        trainable_factors=("lora_S",),
        exact_averaging=True,
        trainable_count=diagonal_trainable_count,
    ),
    "loldu": AdapterKind(
        make_config=lambda c: LoLDUConfig(rank=c.rank, target_modules=c.target_module_names),
        wrap=loldu_linear,
        trainable_factors=("lora_S",),
        exact_averaging=True,
        trainable_count=diagonal_trainable_count,
    ),
    "lora_sb": AdapterKind(
        make_config=lambda c: LoRASBConfig(rank=c.rank, target_modules=c.target_module_names),
        wrap=lora_sb_linear,
        trainable_factors=("lora_R",),
        exact_averaging=True,
        trainable_count=core_trainable_count,
        gradient_init=bases_from_gradient,
    ),
    "nola": AdapterKind(
        make_config=lambda c: NOLAConfig(rank=c.rank, alpha=c.alpha, num_bases=c.nola_bases,
                                         target_modules=c.target_module_names, seed=c.seed),
        wrap=NOLALinear,
        trainable_factors=("nola_A", "nola_B"),
        exact_averaging=False,  # ΔW is bilinear in the two coefficient vectors
        trainable_count=nola_trainable_count,
    ),
    "randlora": AdapterKind(
        make_config=lambda c: RandLoRAConfig(rank=c.rank, alpha=c.alpha, target_modules=c.target_module_names,
                                             seed=c.seed),
        wrap=RandLoRALinear,
        trainable_factors=("randlora_lambda", "randlora_gamma"),
        exact_averaging=False,  # ΔW is bilinear in (λ, γ)
        trainable_count=randlora_trainable_count,
        peft_config=randlora_peft_config,
        peft_frozen=fill_peft_bases,
    ),
    "salt": AdapterKind(
        make_config=lambda c: SALTConfig(rank=c.rank, lora_rank=c.salt_lora_rank, alpha=c.alpha,
                                         target_modules=c.target_module_names, seed=c.seed),
        wrap=SALTLinear,
        trainable_factors=("salt_scale", "salt_shift", "lora_A", "lora_B"),
        exact_averaging=False,  # the LoRA part is bilinear; (a, b) average exactly only while no ReLU clips
        trainable_count=salt_trainable_count,
    ),
    "bone": AdapterKind(
        make_config=lambda c: BoneConfig(rank=c.rank, target_modules=c.target_module_names),
        wrap=BoneLinear,
        trainable_factors=("miss_block",),
        exact_averaging=True,  # ΔW = tile(bᵀ) is linear in b and does not involve W0
        trainable_count=bone_trainable_count,
        peft_config=bone_peft_config,
    ),
    "bat": AdapterKind(
        make_config=lambda c: BatConfig(rank=c.rank, target_modules=c.target_module_names),
        wrap=BatLinear,
        trainable_factors=("miss_block",),
        exact_averaging=True,  # ΔW_ij = (W0_ij + I) b_i is linear in b (W0 is the same everywhere)
        trainable_count=bat_trainable_count,
        peft_config=bat_peft_config,
    ),
    "block_lora": AdapterKind(
        make_config=lambda c: BlockLoRAConfig(rank=c.rank, alpha=c.alpha, blocks=c.block_lora_blocks,
                                              dropout=c.lora_dropout, target_modules=c.target_module_names,
                                              seed=c.seed),
        wrap=BlockLoRALinear,
        trainable_factors=("block_A", "block_B"),
        exact_averaging=False,  # ΔW = s B tile(A_0) is bilinear, as LoRA's
        trainable_count=block_lora_trainable_count,
    ),
    "hydra": AdapterKind(
        make_config=lambda c: HydraConfig(rank=c.rank, alpha=c.alpha, dropout=c.lora_dropout,
                                          target_modules=c.target_module_names, seed=c.seed),
        wrap=HydraLinear,
        trainable_factors=("hydra_par_A", "hydra_par_B", "hydra_seq_A", "hydra_seq_B"),
        exact_averaging=False,  # each branch's ΔW is bilinear in its (A, B)
        trainable_count=hydra_trainable_count,
    ),
    "wara": AdapterKind(
        make_config=lambda c: WaRAConfig(rank=c.rank, alpha=c.alpha, target_modules=c.target_module_names,
                                         seed=c.seed),
        wrap=WaRALinear,
        trainable_factors=tuple(f"wara_{band}_{side}" for band in ("LL", "LH", "HL", "HH") for side in "AB"),
        exact_averaging=False,  # bilinear in each sub-band's (A, B)
        trainable_count=wara_trainable_count,
    ),
    "sltrain": AdapterKind(
        make_config=lambda c: SLTrainConfig(rank=c.rank, alpha=c.alpha, density=c.sltrain_density,
                                            target_modules=c.target_module_names, seed=c.seed),
        wrap=SLTrainLinear,
        trainable_factors=("lora_A", "lora_B", "sltrain_S"),
        exact_averaging=False,  # S's values average exactly (one seeded support), B A does not
        trainable_count=sltrain_trainable_count,
    ),
    "sara": AdapterKind(
        make_config=lambda c: SaRAConfig(density=c.sara_density, target_modules=c.target_module_names),
        wrap=SaRALinear,
        trainable_factors=("sara_delta",),
        exact_averaging=True,  # ΔW = scatter(Ω, δ) is linear in δ, on the one Ω every party computes from W0
        trainable_count=sara_trainable_count,
    ),
    "full": AdapterKind(
        make_config=lambda c: FullConfig(target_modules=c.target_module_names),
        wrap=FullLinear,
        trainable_factors=(FULL_FACTOR,),
        exact_averaging=True,  # W0 + ΔW is linear in ΔW: the mean of the ΔW is the mean of the weights
        trainable_count=full_trainable_count,
    ),
    "smora": AdapterKind(
        make_config=lambda c: SMoRAConfig(rank=c.rank, alpha=c.alpha, top_k=c.smora_top_k,
                                          target_modules=c.target_module_names, seed=c.seed),
        wrap=SMoRALinear,
        trainable_factors=("lora_A", "lora_B", "smora_router"),
        exact_averaging=False,  # bilinear in (A, B), and the router gates per token
        trainable_count=smora_trainable_count,
        rank_identity_matters=True,
        rank_identity_reason="is one expert of its router, so the router would gate rotated ranks",
    ),
    "sora": AdapterKind(
        make_config=lora_config,
        wrap=SoRALinear,
        trainable_factors=("lora_A", "lora_B", "sora_gate"),
        exact_averaging=False,  # ΔW = s B diag(g) A is trilinear
        trainable_count=sora_trainable_count,
        rank_identity_matters=True,
        rank_identity_reason=("has its own gate g_i, pruned to 0 by SoRA's proximal step, and an SVD of B A "
                              "would mix the ranks under the gates (and ignore g)"),
    ),
    "codyra": AdapterKind(
        make_config=codyra_config,
        wrap=CoDyRALinear,
        trainable_factors=("lora_A", "lora_B", "codyra_gate"),
        exact_averaging=False,  # ΔW = B diag(w) A is trilinear
        trainable_count=codyra_trainable_count,
        rank_identity_matters=True,
        rank_identity_reason=("has its own importance weight w_i, pruned to 0 by CoDyRA's proximal step, and an "
                              "SVD of B A would mix the ranks under the weights (and ignore w)"),
    ),
    "allora": AdapterKind(
        make_config=allora_config,
        wrap=allora_linear,
        trainable_factors=("lora_A", "lora_B"),
        exact_averaging=False,  # LoRA's B A
        trainable_count=lora_trainable_count,
        # PEFT's LoRA at lora_alpha = r is ALLoRA's scale-free W0 + B A (the step rule is training-only)
        peft_config=lambda c, heads: lora_peft_config(dataclasses.replace(c, alpha=float(c.rank)), heads),
    ),
    "transformed_lora": AdapterKind(
        make_config=lambda c: TransformedLoRAConfig(rank=c.rank, alpha=c.alpha, target_modules=c.target_module_names,
                                                    seed=c.seed),
        wrap=TransformedLoRALinear,
        trainable_factors=("tlora_T1", "tlora_T2", "lora_A", "lora_B"),
        exact_averaging=False,  # T = T_1 ⊗ T_2 and B A are both bilinear
        trainable_count=transformed_lora_trainable_count,
    ),
    "diffora": AdapterKind(
        make_config=diffora_config,
        wrap=diffora_linear,
        trainable_factors=("lora_A", "lora_B"),  # on the kept modules; the dropped ones train nothing
        exact_averaging=False,  # LoRA's
        trainable_count=diffora_trainable_count,
        selects_modules=True,
    ),
}


def gradient_init_of(config: RunConfig) -> Callable[[torch.Tensor, object], dict[str, torch.Tensor]] | None:
    """What turns a layer's full-weight gradient into its frozen factors in this run: the adapter's own
    (LoRA-SB's bases) or its `lora-init`'s (LoRA-GA's start); None if no init of this run reads a gradient."""
    kind = get_adapter(config.adapter)
    if kind.takes_lora_init and get_lora_init(config.lora_init).from_gradient is not None:
        return start_from_gradient
    return kind.gradient_init


def reads_init_data(config: RunConfig) -> bool:
    """Does something before round 1 read data (`init-data` says whose)?"""
    return gradient_init_of(config) is not None or get_adapter(config.adapter).selects_modules


def private_init_steps(config: RunConfig) -> int:
    """DP steps a client spends before round 1: one if the run's init reads the clients' data."""
    return int(config.init_data == "private" and gradient_init_of(config) is not None)


def init_summary(config: RunConfig) -> dict | None:
    """What the run's adapter init read before round 1, for the privacy report: {"name", "data"} with data
    "public" / "private" (`init-data`) or "none" (data-free, PiSSA); None for an init that is LoRA's own."""
    kind = get_adapter(config.adapter)
    lora_init = get_lora_init(config.lora_init) if kind.takes_lora_init else None
    if reads_init_data(config):
        named = lora_init is not None and lora_init.from_gradient is not None
        return {"name": config.lora_init if named else config.adapter, "data": config.init_data}
    if lora_init is not None and lora_init.offsets_base:
        return {"name": config.lora_init, "data": "none"}
    return None


def get_adapter(name: str) -> AdapterKind:
    if name not in ADAPTERS:
        raise ConfigError(f"unknown adapter {name!r}; available: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]
