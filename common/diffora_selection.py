"""DiffoRA's module selection: a continuous relaxation of "which modules get LoRA", on public data only.

Every candidate module k keeps its LoRA behind a gate, h = W0 x + σ(α_k) s B_k A_k x. First-order DARTS
alternates one Adam step of the LoRA weights (and head) on a batch of the train half with one step of
the gate logits α on a batch of the held-out half; the relaxed and the discrete network share the LoRA
weights. Then the `diffora-keep` fraction of the candidates with the largest α is kept (at least one).

`select_on_public_split` reads only the server's public split, so the choice costs no privacy budget.
Launchers call `resolve_diffora_modules` before `flwr run` (the demo, the sweep); by hand,
`python -m common.diffora_selection --run-config "..."` prints the `diffora-modules` setting to pass, and
the ServerApp refuses a DiffoRA run without one (`require_selection`). Why not at server start-up: the
clients build their adapters from the run config, which the server cannot change once the run started,
and sending the choice in round 1's message would let the clients' models differ from the run config.
It is deterministic given the run config: seeded LoRA init, a fixed batch order, dropout off, α = 0 at
start and ties broken by module name.

Decisions (the card marks them "unsure"): a sigmoid gate per module (a two-way softmax over [α, 0] is
the same σ(α)); first-order DARTS (no unrolled second-order step); the LoRA weights of the search are
dropped: the federated run starts from a fresh LoRA on the kept modules (the card's "then fine-tune"), so
nothing but the choice itself enters the run. `SEARCH_STEPS` alternations, at the run's `lr`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.adapters.base import AdapterLayer
from common.adapters.inject import replace_module
from common.config import RunConfig
from common.errors import ConfigError, exit_on_user_error

SEARCH_STEPS = 20


class GatedLayer(nn.Module):
    """h = W0 x + σ(α) ΔW x: one candidate's adapter behind a trainable gate logit α (starts at 0)."""

    def __init__(self, layer: AdapterLayer):
        super().__init__()
        self.layer = layer
        self.logit = nn.Parameter(torch.zeros((), dtype=layer.base.weight.dtype, device=layer.base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.base(x) + torch.sigmoid(self.logit) * self.layer.branch(x)


def relax(model: nn.Module) -> dict[str, GatedLayer]:
    """Put a gate around every adapter layer of `model` (in place); {module name: its gate}."""
    gates = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            gates[name] = GatedLayer(module)
            replace_module(model, name, gates[name])
    return gates


def search_gates(model: nn.Module, train_batches: Sequence, held_out_batches: Sequence,
                 loss_fn: Callable[[nn.Module, object], torch.Tensor], steps: int, lr: float) -> dict[str, float]:
    """First-order DARTS on a model with adapter layers (relaxed in place); the final α of each candidate."""
    gates = relax(model)
    logits = [gate.logit for gate in gates.values()]
    gate_ids = {id(p) for p in logits}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    phases = ((torch.optim.Adam(weights, lr=lr), train_batches), (torch.optim.Adam(logits, lr=lr), held_out_batches))
    for step in range(steps):
        for optimizer, batches in phases:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batches[step % len(batches)]).backward()
            optimizer.step()
    return {name: float(gate.logit.detach()) for name, gate in gates.items()}


def discretize(logits: dict[str, float], keep: float) -> tuple[str, ...]:
    """The round(keep x candidates) (at least one) candidates with the largest α, ties by name; sorted."""
    count = max(1, round(keep * len(logits)))
    ranked = sorted(logits, key=lambda name: (-logits[name], name))
    return tuple(sorted(ranked[:count]))


def select_on_public_split(config: RunConfig, steps: int = SEARCH_STEPS) -> tuple[str, ...]:
    """The modules DiffoRA keeps for this run config, chosen on the server's public split (no privacy cost).

    Pass the result, comma-joined, as run config `diffora-modules` (`resolve_diffora_modules` does).
    """
    return discretize(public_split_logits(config, steps), config.diffora_keep)


def public_split_logits(config: RunConfig, steps: int = SEARCH_STEPS) -> dict[str, float]:
    """The final gate logit α of every candidate module after the search on the server's public split."""
    from common.data.partition import public_split
    from common.model import build_model
    from common.tensors import encode

    config = dataclasses.replace(config, adapter="diffora", diffora_modules="")
    data = public_split(config)
    adapted = build_model(config, num_labels=len(data.label_names))
    adapted.model.eval()  # dropout off: the choice must not depend on a dropout sample
    encoded = encode(adapted.tokenizer, data, config.max_seq_len).tensors
    order = np.random.default_rng(config.seed + 104729).permutation(len(data))
    halves = [torch.from_numpy(np.sort(part)) for part in np.array_split(order, 2)]
    batches = [[tuple(t[part[i : i + config.batch_size]] for t in encoded)
                for i in range(0, len(part), config.batch_size)] for part in halves]

    def loss(model: nn.Module, batch) -> torch.Tensor:
        input_ids, attention_mask, labels = batch
        return F.cross_entropy(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)

    return search_gates(adapted.model, batches[0], batches[1], loss, steps, config.lr)


SELECT_COMMAND = "python -m common.diffora_selection"


def needs_selection(config: RunConfig) -> bool:
    """A DiffoRA run whose kept modules are not chosen yet (`diffora-modules = ""`)."""
    return config.adapter == "diffora" and not config.diffora_modules.strip()


def require_selection(config: RunConfig) -> None:
    """The ServerApp's check: a DiffoRA run must name its kept modules, identically on every party.

    The clients build their model from the run config, which no party can change once the run started, so
    the selection happens before it (the demo and the sweep run it themselves; `flwr run` by hand: the
    command below).
    """
    if needs_selection(config):
        raise ConfigError(
            f"adapter 'diffora' needs its module selection before the run, but diffora-modules = \"\": run "
            f"`{SELECT_COMMAND} --run-config \"...\"` with this run's settings and pass the "
            f"diffora-modules=\"...\" it prints to flwr run (python -m simulations.demo does this by itself)"
        )


def resolve_diffora_modules(config: RunConfig, overrides: dict, log: Callable[[str], None] = print,
                            steps: int = SEARCH_STEPS) -> tuple[RunConfig, dict]:
    """For a launcher, before `flwr run`: (config, overrides) with `diffora-modules` chosen.

    A DiffoRA run without kept modules gets the selection on the public split here (about half a minute on
    the default model), printed, and its result goes into the run-config overrides, so every party builds
    the same adapters. Explicit modules are checked against the model (a one-line ConfigError). Any other
    adapter is returned unchanged.
    """
    if config.adapter != "diffora":
        return config, overrides
    if not needs_selection(config):
        from common.data.partition import global_test_set
        from common.model import build_model

        build_model(config, num_labels=len(global_test_set(config).label_names))  # checks the names
        return config, overrides
    log(f"fedlora: DiffoRA: selecting the kept modules on the server's public split ({config.public_examples} "
        f"examples, {steps} search steps, no privacy cost) ...")
    started = time.time()
    logits = public_split_logits(config, steps)
    kept = discretize(logits, config.diffora_keep)
    modules = ",".join(kept)
    log(f"fedlora: DiffoRA keeps {len(kept)} of {len(logits)} target modules (diffora-keep = "
        f"{config.diffora_keep:g}) in {time.time() - started:.0f} s: diffora-modules=\"{modules}\"")
    return dataclasses.replace(config, diffora_modules=modules), {**overrides, "diffora-modules": modules}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`python -m common.diffora_selection --run-config "..."`: print the diffora-modules setting for flwr run."""
    import argparse
    import sys

    from simulations.demo import default_run_config, parse_overrides

    parser = argparse.ArgumentParser(
        description="DiffoRA's module selection on the server's public split (no privacy cost); prints the "
                    "diffora-modules setting to pass to `flwr run`. Run it where the server's data is, with "
                    "the run's own settings (the selection depends on the model, data, seed, rank, lr ...).")
    parser.add_argument("--run-config", action="append", default=[],
                        help='the run\'s overrides, as for flwr run, e.g. "diffora-keep=0.25 rank=4"')
    parser.add_argument("--steps", type=int, default=SEARCH_STEPS, help=f"search steps (default {SEARCH_STEPS})")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise ConfigError("--steps must be >= 1")
    overrides = parse_overrides(args.run_config)
    if overrides.get("adapter", "diffora") != "diffora":
        raise ConfigError(f"adapter = {overrides['adapter']!r}: the selection is DiffoRA's; use adapter=\"diffora\"")
    config = RunConfig.from_flower({**default_run_config(), **overrides, "adapter": "diffora", "diffora-modules": ""})
    config, chosen = resolve_diffora_modules(config, {}, log=lambda line: print(line, file=sys.stderr, flush=True),
                                             steps=args.steps)
    print(f"pass it to flwr run: --run-config 'adapter=\"diffora\" diffora-modules=\"{config.diffora_modules}\" ...'",
          file=sys.stderr)
    print(f"diffora-modules=\"{chosen['diffora-modules']}\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
