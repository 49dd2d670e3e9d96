"""What every adapter layer shares: a frozen base `nn.Linear`, an additive branch, merge and unmerge.

An adapter computes W0 x + branch(x) with branch(x) = ΔW x. `merge` folds ΔW into the base weight (for
export and fast inference) and `unmerge` takes it out again; while merged, the branch is skipped.
Subclasses hold their factors as sub-modules (frozen or trainable) and no buffers; each trainable
sub-module is an `nn.Linear` or has its own registered Opacus grad sampler (`diagonal.py`, `nola.py`).
"""

from __future__ import annotations

import torch
from torch import nn


class ScaledByAlphaOverRank:
    """Mixin for adapter configs with `rank` and `alpha`: the update is scaled by s = alpha / rank."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class AdapterLayer(nn.Module):
    # False where the update depends on the input (SMoRA's per-token router): there is no single ΔW, so
    # `merge` and `delta_weight` raise a ConfigError, export refuses, and weight diagnostics skip the layer
    mergeable = True

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.merged = False

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution ΔW x (plus dropout where the adapter has it)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW (d_out x d_in), the dense update the branch adds to the base weight."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + self.branch(x)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False



class RemembersMergedDelta:
    """For adapter layers whose ΔW depends on W0 (DoRA's row norms, Bat's W0 blocks): once merged, W0 has
    changed, so `unmerge` subtracts the ΔW that `merge` added instead of recomputing it. The layer sets
    `self._merged_delta = None` in `__init__` (a plain attribute: a buffer beside trainable parameters would
    break Opacus) and returns it from `delta_weight` while merged."""

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merged_delta = self.delta_weight().detach().clone()
            self.base.weight += self._merged_delta.to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self._merged_delta.to(self.base.weight.dtype)
            self._merged_delta = None
            self.merged = False

def frozen_linear(weight: torch.Tensor, like: nn.Linear) -> nn.Linear:
    """A bias-free `nn.Linear` holding `weight` (out x in), frozen, on `like`'s device and dtype."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.to(device=like.weight.device, dtype=like.weight.dtype)
    return layer.requires_grad_(False)
