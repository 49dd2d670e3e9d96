"""Local training of the adapter with DP-SGD (Opacus): the client's one heavy function.

Poisson sampling at rate q = 1/len(loader), per-sample clipping to `max_grad_norm`, Gaussian noise
of std `noise_multiplier * max_grad_norm`, averaged over the expected batch size. The PrivacyEngine
is created per call and its accountant is not used: spending is recorded by the caller's ledger,
which outlives rounds and processes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.tensors import trim
from common.training import StepPiece, base_model_logits, get_update_rule, privatize_then_update
from common.training.update_rules import OptimizerFactory


@dataclass(frozen=True)
class DPSettings:
    """Noise and clipping for one round; `noise_multiplier = None` trains without DP."""

    noise_multiplier: float | None
    max_grad_norm: float
    grad_sample_mode: str = "hooks"


@dataclass(frozen=True)
class LocalResult:
    steps: int
    mean_loss: float
    first_loss: float
    sample_rate: float
    optimizer_state_bytes: int = 0  # the update rule's state (Adam's moments, GaLore's projected ones, ...)


def fresh_generator(device: torch.device, seed: int | None = None) -> torch.Generator:
    """A generator seeded from the OS unless a test asks for a fixed seed.

    DP noise and Poisson sampling must not be predictable from the public run config.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def train_locally(
    model: nn.Module,
    data: TensorDataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    dp: DPSettings,
    device: torch.device,
    sampling_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    optimizer_name: str = "adam",
    trim_padding: bool = True,
    before_step: Callable[[], None] | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    make_optimizer: OptimizerFactory | None = None,
    pieces: Sequence[StepPiece] = (),
    base_logits: bool = False,
) -> LocalResult:
    """Run exactly `steps` optimizer steps (re-iterating the loader as needed).

    `trim_padding` drops padding columns no example of the batch uses (same result, less compute).
    `before_step` is called first thing in every step, before its gradients or noise exist: the privacy
    ledger counts the step there (`PrivacyLedger.count_step`), so a crash can never hide one.
    `loss_fn(logits, labels)` is the batch-mean training loss (LoKU's inverted hinge loss, client/loku.py); it
    must be a mean of per-example terms, as DP-SGD's per-sample clipping assumes (the run's `loss`,
    `common.training.training_loss`). With `base_logits` it is called as `loss_fn(logits, labels, base)`, `base`
    the logits of the same batch with every adapter off and no gradient (BA-LoRA's consistency term).
    The optimizer is `make_optimizer` (the run's update rule, `common.training.optimizer_factory`), else the
    update rule `optimizer_name` at its default settings; it and the `pieces` (rank schedule, proximal steps)
    act only on the privatized gradient, after Opacus' clipping and noise (`common/training/pieces.py`).
    """
    model.to(device)
    model.train()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = (make_optimizer or get_update_rule(optimizer_name).make(RunConfig()))(named, lr)
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True,
        generator=sampling_generator or fresh_generator(torch.device("cpu")),
    )
    sample_rate = 1.0 / len(loader)
    if dp.noise_multiplier is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
            noise_generator=noise_generator or fresh_generator(device), grad_sample_mode=dp.grad_sample_mode,
        )
    with warnings.catch_warnings():
        # Opacus' backward hooks on the first adapted layer (whose input needs no grad) trigger a harmless
        # torch warning on every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            losses = _run_steps(model, optimizer, loader, steps, device, trim_padding, before_step, loss_fn, pieces,
                                base_logits)
        finally:
            for piece in pieces:
                piece.close()
    if hasattr(model, "_close"):
        model._close()  # remove Opacus' hooks and per-sample attributes: the module is reusable afterwards
    finite = [x for x in losses if x == x]
    return LocalResult(
        steps=len(losses),
        mean_loss=sum(finite) / max(len(finite), 1),
        first_loss=finite[0] if finite else float("nan"),
        sample_rate=sample_rate,
        optimizer_state_bytes=state_bytes(getattr(optimizer, "original_optimizer", optimizer)),
    )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps (simulations/bench_training.py's memory column)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values() if isinstance(state, dict) else ():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _run_steps(model, optimizer, loader, steps: int, device: torch.device, trim_padding: bool,
               before_step: Callable[[], None] | None = None, loss_fn=F.cross_entropy,
               pieces: Sequence[StepPiece] = (), base_logits: bool = False) -> list[float]:
    """The loss of each of `steps` optimizer steps (NaN for an empty Poisson batch)."""
    losses: list[float] = []
    while len(losses) < steps:
        for input_ids, attention_mask, labels in loader:
            if before_step is not None:
                before_step()
            for piece in pieces:
                piece.before_forward(len(losses))
            if trim_padding:
                input_ids, attention_mask = trim(input_ids, attention_mask)
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:
                # An empty Poisson batch is still a DP step: the optimizer adds pure noise.
                give_empty_per_sample_gradients(optimizer)
                privatize_then_update(optimizer, pieces)
                losses.append(float("nan"))
            else:
                inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                logits = model(**inputs).logits
                if base_logits:
                    loss = loss_fn(logits, labels.to(device), base_model_logits(model, **inputs))
                else:
                    loss = loss_fn(logits, labels.to(device))
                loss.backward()
                privatize_then_update(optimizer, pieces)
                losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
    return losses


def give_empty_per_sample_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Per-sample gradients of an empty batch (shape 0 x param) for every DP parameter.

    No forward runs on an empty Poisson batch, so Opacus' hooks record nothing and its `pre_step` would
    fail on the missing `grad_sample`; with zero rows it clips and sums nothing and adds the noise
    (Opacus' own empty-batch branch), which is what the accountant counted. Without DP, nothing to do.
    """
    if not hasattr(optimizer, "pre_step"):
        return
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
