"""Plain LoRA (Hu et al. 2021): W x + s * B A x with s = alpha / r, base weight frozen.

A and B are ordinary `nn.Linear` modules so that Opacus computes their per-sample gradients with its
built-in einsum grad sampler (hooks mode), and so that a strategy can freeze A by `requires_grad`.
A is initialised from a generator seeded by (seed, module name): every party that builds the model
with the same seed gets the same A, which is what lets FFA-LoRA send only a seed instead of A.
With a non-default `init` (run config `lora-init`, `common/adapters/lora_inits.py`: PiSSA, LoRA-GA) the layer
also holds the start B0, A0 as frozen `lora_init_B`, `lora_init_A` and trains on the residual base
W0 - s B0 A0; without one it has no such factors, so default LoRA state dicts are unchanged.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank, frozen_linear
from common.adapters.lora_inits import LoRAInit, get_lora_init
from common.errors import ConfigError


@dataclass(frozen=True)
class LoRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42
    init: str = "default"  # run config lora-init


class LoRALinear(AdapterLayer):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    # A 0/1 vector over the r ranks that a rank schedule (DyLoRA, `common/training/dylora.py`) sets for one
    # step; a plain attribute, not a buffer (Opacus), and None (every rank on) outside a schedule's steps
    rank_mask: torch.Tensor | None = None

    def __init__(self, base: nn.Linear, config: LoRAConfig, name: str):
        super().__init__(base)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False)
        self.lora_A.to(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B.to(device=base.weight.device, dtype=base.weight.dtype)
        self.reset_parameters(seed_for(config.seed, name))
        init = get_lora_init(config.init)
        if init.offsets_base:
            self.start_from(init, config, name)

    def start_from(self, init: LoRAInit, config: LoRAConfig, name: str) -> None:
        """Add the frozen start B0, A0 and set B, A to it: W0 x - s B0 A0 x + s B A x is W0 x at the start.

        PiSSA's start comes from W0 here, on every party. LoRA-GA's comes from data, once, on the server: until
        its arrays are loaded the start is 0 and B = 0, so the layer is W0 (what its init gradient is read at).
        """
        d_out, d_in = self.base.out_features, self.base.in_features
        if init.from_weight is not None:
            b0, a0 = init.from_weight(self.base.weight, config.rank, self.scaling)
        else:
            if 2 * config.rank > min(d_out, d_in):
                raise ConfigError(f"lora-init = {config.init!r} takes 2 x rank singular vectors of each layer's "
                                  f"gradient, and layer {name} is {d_out} x {d_in}: use rank <= {min(d_out, d_in) // 2}")
            b0, a0 = torch.zeros(d_out, config.rank), torch.zeros(config.rank, d_in)
        self.lora_init_B = frozen_linear(b0, like=self.base)
        self.lora_init_A = frozen_linear(a0, like=self.base)
        if init.from_weight is not None:
            with torch.no_grad():
                self.lora_B.weight.copy_(self.lora_init_B.weight)
                self.lora_A.weight.copy_(self.lora_init_A.weight)

    @property
    def has_start(self) -> bool:
        return hasattr(self, "lora_init_A")

    def reset_parameters(self, seed: int) -> None:
        """A ~ Kaiming-uniform (as in PEFT) from a named seed; B = 0 so training starts at W0."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.base.in_features)
        with torch.no_grad():
            a = torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s * B A (minus the start s * B0 A0 where there is one), the dense change of W0 (d_out x d_in)."""
        delta = self.scaling * self.lora_B.weight @ self.lora_A.weight
        if self.has_start:
            delta = delta - self.scaling * self.lora_init_B.weight @ self.lora_init_A.weight
        return delta

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lora_A(self.dropout(x))
        if self.rank_mask is not None:  # B's per-sample gradients then see zeros on the masked ranks
            hidden = hidden * self.rank_mask
        out = self.scaling * self.lora_B(hidden)
        if self.has_start:  # the residual base's low-rank part, on the undropped input (PEFT's W0 - s B0 A0)
            out = out - self.scaling * self.lora_init_B(self.lora_init_A(x))
        return out


def start_from_gradient(gradient: torch.Tensor, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """A layer's frozen start from its full-weight gradient (LoRA-GA): the `gradient_init` of adapter lora."""
    b0, a0 = get_lora_init(config.init).from_gradient(gradient, config.rank)
    return {"lora_init_B.weight": b0, "lora_init_A.weight": a0}


def trained_from_start(frozen: dict) -> dict:
    """The trainable B, A that start at a data-driven start (`start_from_gradient`'s arrays, any layer)."""
    return {key.replace(".lora_init_", ".lora_"): value for key, value in frozen.items() if ".lora_init_" in key}


def as_plain_lora(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each started layer's pair as one plain LoRA of rank 2r on W0 (what PEFT converts PiSSA
    and LoRA-GA adapters to): s (B A - B0 A0) = s [B, -B0] [A; A0]; keep s by doubling alpha with the rank."""
    out = dict(tensors)
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear) and layer.has_start:
            out[f"{name}.lora_A.weight"] = torch.cat([layer.lora_A.weight, layer.lora_init_A.weight]).detach()
            out[f"{name}.lora_B.weight"] = torch.cat([layer.lora_B.weight, -layer.lora_init_B.weight], 1).detach()
    return out


def seeded_lora_pair(base: nn.Linear, rank: int, seed: int) -> tuple[nn.Linear, nn.Linear]:
    """(A, B) as LoRA's own, on `base`'s device and dtype: A from the seed, B = 0 (FFA-LoRA rebuilds A)."""
    a = nn.Linear(base.in_features, rank, bias=False)
    b = nn.Linear(rank, base.out_features, bias=False)
    bound = 1.0 / math.sqrt(base.in_features)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a.weight.copy_(torch.empty(a.weight.shape).uniform_(-bound, bound, generator=generator))
        b.weight.zero_()
    return (a.to(device=base.weight.device, dtype=base.weight.dtype),
            b.to(device=base.weight.device, dtype=base.weight.dtype))


def seed_for(seed: int, name: str) -> int:
    """A per-module seed that does not depend on the order modules are visited in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def lora_trainable_count(d_out: int, d_in: int, config: LoRAConfig) -> int:
    """r (d_in + d_out): A is r x d_in, B is d_out x r."""
    return config.rank * (d_in + d_out)
