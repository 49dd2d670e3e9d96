"""DyLoRA (Valipour et al. 2023): nested ranks, trained by truncating LoRA to a random rank b each step.

At each step b ~ Uniform{1..r} and the layer computes h = W0 x + (α/b) B[:, :b] A[:b, :] x. The truncation
is a 0/1 mask on the rank dimension (`LoRALinear.rank_mask`, applied to A x before B) rather than a slice,
so Opacus' `nn.Linear` samplers still give exact per-sample gradients, which are zero on the masked ranks:
clipping only sees the active ranks. The noise Opacus then adds to the whole tensor is zeroed on the
masked ranks, and after the update those ranks are put back to their values before the step, so Adam's
momentum does not move them either: a step at rank b trains exactly the first b ranks (the card's
non-"frozen" mode; its "frozen" mode, only the b-th rank, is not built). Both are post-processing.

b is data-independent: drawn from a generator seeded by (run seed, round), so every client of a round
draws the same sequence of ranks and a rerun draws them again; it costs no privacy. A model trained this
way can be truncated to any prefix rank b afterwards (scale α/b).
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.lora import LoRALinear, seed_for
from common.errors import ConfigError
from common.training.pieces import StepPiece


def rank_sequence(seed: int, server_round: int, rank: int, steps: int) -> list[int]:
    """The ranks b_1..b_steps of one round, each uniform on {1..rank}; the same for every client."""
    generator = torch.Generator().manual_seed(seed_for(seed, f"dylora-round-{server_round}"))
    return [int(b) for b in torch.randint(1, rank + 1, (steps,), generator=generator)]


def prefix_mask(rank: int, b: int, like: torch.Tensor) -> torch.Tensor:
    """1 on the first b of `rank` entries, 0 after, on `like`'s device and dtype."""
    return (torch.arange(rank, device=like.device) < b).to(like.dtype)


def rank_axes(layer: LoRALinear) -> list[tuple[nn.Parameter, int]]:
    """The layer's trainable tensors indexed by rank, with the axis: A (r x d_in) 0, B (d_out x r) 1, gate 0."""
    axes = [(layer.lora_A.weight, 0), (layer.lora_B.weight, 1)]
    if hasattr(layer, "sora_gate"):
        axes.append((layer.sora_gate.weight, 0))
    return [(p, dim) for p, dim in axes if p.requires_grad]


class DyLoRASchedule(StepPiece):
    """Truncate every `LoRALinear` of the model to rank b_t at step t (b_t from `rank_sequence`)."""

    def __init__(self, model: nn.Module, seed: int, server_round: int, steps: int):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        ranks = {layer.lora_A.out_features for layer in self.layers}
        if len(ranks) != 1:
            raise ConfigError(f"rank-schedule = 'dylora' needs LoRA layers of one rank; this model has {sorted(ranks)}")
        self.rank = ranks.pop()
        self.sequence = rank_sequence(seed, server_round, self.rank, steps)
        self.full_scaling = [layer.scaling for layer in self.layers]
        # (tensor, its rank axis): A's rows, B's columns, SoRA's gates; ranks above b stay as they were
        self.rank_indexed = [(p, dim) for layer in self.layers for p, dim in rank_axes(layer)]
        self.b = self.rank
        self._kept: list[torch.Tensor] = []

    def before_forward(self, step: int) -> None:
        self.b = self.sequence[step % len(self.sequence)]
        for layer, scaling in zip(self.layers, self.full_scaling):
            layer.rank_mask = prefix_mask(self.rank, self.b, layer.lora_A.weight)
            layer.scaling = scaling * self.rank / self.b  # α/r -> α/b

    def before_update(self) -> None:
        self._kept = []
        for p, dim in self.rank_indexed:
            above = p.detach().narrow(dim, self.b, self.rank - self.b)
            self._kept.append(above.clone())
            if p.grad is not None:
                p.grad.narrow(dim, self.b, self.rank - self.b).zero_()

    def after_update(self) -> None:
        with torch.no_grad():
            for (p, dim), above in zip(self.rank_indexed, self._kept):
                p.narrow(dim, self.b, self.rank - self.b).copy_(above)

    def close(self) -> None:
        for layer, scaling in zip(self.layers, self.full_scaling):
            layer.rank_mask = None
            layer.scaling = scaling


def truncated(arrays: dict, b: int) -> dict:
    """A DyLoRA adapter's arrays cut to its first b ranks: A's first b rows, B's first b columns, SoRA's first
    b gates; every other tensor (the head) as it is. Built at rank b, the layer's scale is then alpha/b: the
    model the schedule trained at b."""
    out = {}
    for key, value in arrays.items():
        if key.endswith("lora_A.weight") or key.endswith("sora_gate.weight"):
            out[key] = value[:b]
        elif key.endswith("lora_B.weight"):
            out[key] = value[:, :b]
        else:
            out[key] = value
    return out
