"""DiffoRA: LoRA on the modules a differentiable (DARTS-style) module selection kept, nothing elsewhere.

The selection (`common/diffora_selection.py`) relaxes "does module k get an adapter" to a gate σ(α_k)
on its LoRA, trains the LoRA weights and the gates alternately on the server's public split, and keeps
the top fraction of the candidates. This adapter is the fine-tuning phase after it: run config
`diffora-modules` names the kept modules, each gets a plain LoRA (the same `lora_A`, `lora_B`, seeds and
strategies as adapter `lora`), and every other candidate (a target module not named) keeps W0 and has no
trainable tensor at all, so it adds nothing to the payload. `diffora-modules = ""` keeps every candidate
(the relaxation with every gate at 1: adapter `lora`).

Privacy: the selection reads public data only and costs no budget. Tuning the gates on the clients'
data would be a second DP training phase to account for, which fedlora does not do, so `init-data =
"private"` is refused for this adapter. The kept set is part of the run config, identical on every party
(the card's "discretize at the server"), so every client holds the same adapters.

When the selection runs: before the run, since no party can change the run config once it started. The
demo and the sweep run it themselves when `diffora-modules = ""` and pass the result to every party;
for `flwr run` by hand, `python -m common.diffora_selection --run-config "..."` prints the setting, and
the ServerApp refuses a DiffoRA run with `diffora-modules = ""` (`require_selection`). Names are checked
against the model when the adapters are injected (`inject_adapters`): one that is not a target module
is a ConfigError listing the candidates. (Building with `""` gives every candidate LoRA, the search's
starting point.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.adapters.base import AdapterLayer, ScaledByAlphaOverRank
from common.adapters.lora import LoRAConfig, LoRALinear
from common.errors import ConfigError


@dataclass(frozen=True)
class DiffoRAConfig(ScaledByAlphaOverRank):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 42
    modules: tuple[str, ...] = ()  # the kept modules (full dotted names); () = every candidate

    def selects(self, name: str) -> bool:
        return not self.modules or name in self.modules


def diffora_config(c) -> DiffoRAConfig:
    """From a RunConfig; the private route is refused (see the module docstring)."""
    if c.init_data == "private":
        raise ConfigError("adapter 'diffora' selects its modules on the server's public split only: tuning its "
                          "gates on the clients' data would be a training phase outside the privacy budget; "
                          "use init-data = \"public\"")
    modules = tuple(sorted({m.strip() for m in c.diffora_modules.split(",") if m.strip()}))
    return DiffoRAConfig(rank=c.rank, alpha=c.alpha, dropout=c.lora_dropout, target_modules=c.target_module_names,
                         seed=c.seed, modules=modules)


class UnselectedLinear(AdapterLayer):
    """A candidate the selection dropped: W0 only, no trainable tensor, ΔW = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.base(x))

    def delta_weight(self) -> torch.Tensor:
        return torch.zeros_like(self.base.weight)


def diffora_linear(base: nn.Linear, config: DiffoRAConfig, name: str) -> AdapterLayer:
    if not config.selects(name):
        return UnselectedLinear(base)
    lora = LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                      target_modules=config.target_modules, seed=config.seed)
    return LoRALinear(base, lora, name)


def diffora_trainable_count(d_out: int, d_in: int, config: DiffoRAConfig) -> int:
    """Per kept layer: LoRA's r (d_in + d_out) (a dropped one has none)."""
    return config.rank * (d_in + d_out)
