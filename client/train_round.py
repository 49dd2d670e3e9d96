"""One federated round on a client, without Flower: budget check, DP training, ledger, reply values.

The ClientApp only converts Flower records to these arguments and back, so this is what tests drive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.dp_training import DPSettings, train_locally
from client.personal_state import load_personal, personal_path, save_personal
from common.adapters.rank_resize import fit_ranks, fold_into_base
from common.adapters.registry import get_adapter
from common.config import RunConfig
from common.data.partition import client_data
from common.evaluation import evaluate
from common.layer_sampling import freeze_other_layers
from common.low_rank_upload import low_rank_payload
from common.model import build_model, pick_device
from common.payload import load_state, trainable_state
from common.privacy import PrivacyLedger, PrivacyStep, calibrate_noise_multiplier, poisson_sample_rate
from common.privacy.plan import check_privacy_plan, planned_dp_steps
from common.tensors import encode
from common.training import head_parameters, optimizer_factory, step_pieces, training_loss


@dataclass
class ClientIdentity:
    """Who this client is and where its ledger lives."""

    client_id: str
    partition_id: int
    num_partitions: int
    ledger_dir: Path
    run_dir: str = ""  # names the run a personal factor file belongs to (client/personal_state.py)

    @property
    def ledger_path(self) -> Path:
        return self.ledger_dir / f"client-{self.client_id}.json"

    @property
    def personal_path(self) -> Path:
        return personal_path(self.ledger_dir, self.client_id)


@dataclass
class TrainOutcome:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float | int]
    ledger: dict
    refused: bool = False
    reason: str = ""
    extra: dict = field(default_factory=dict)


def training_parts(config: RunConfig, model, server_round: int) -> dict:
    """`train_locally`'s keywords for the run's training procedure: update rule, step pieces, loss (also what
    simulations/bench_training.py times)."""
    loss = training_loss(config)
    return dict(make_optimizer=optimizer_factory(config, head_parameters(model)),
                pieces=step_pieces(config, model, server_round),
                loss_fn=loss.fn, base_logits=loss.base_logits)


def open_ledger(config: RunConfig, identity: ClientIdentity) -> PrivacyLedger:
    return PrivacyLedger(identity.ledger_path, identity.client_id, config.target_epsilon, config.delta,
                         config.accountant)


def noise_for(config: RunConfig, sample_rate: float) -> float | None:
    """The round's noise multiplier: given, calibrated to the planned participation, or None (no DP)."""
    if config.noise_multiplier > 0:
        return config.noise_multiplier
    if not math.isfinite(config.target_epsilon):
        return None
    return calibrate_noise_multiplier(config.target_epsilon, config.delta, sample_rate, planned_dp_steps(config),
                                      config.accountant)


def train_round(
    config: RunConfig, identity: ClientIdentity, arrays: dict[str, np.ndarray], frozen: tuple[str, ...],
    server_round: int, fold: bool = False, personal: tuple[str, ...] = (),
    train_layers: tuple[int, ...] | None = None,
) -> TrainOutcome:
    """Train the received adapter locally under DP-SGD, or refuse if the budget does not allow it.

    `fold`: the received LoRA factors are a global update to add to the base weights (FLoRA), and the
    client trains a fresh LoRA of its own rank on top; otherwise they initialise the client's LoRA.
    `personal`: factors this client keeps (FedSA-LoRA's `lora_B`): loaded from its own disk before training
    (the adapter's init in its first round), trained in the same DP-SGD steps, saved after, never returned.
    `train_layers`: the transformer layers the server sampled this round (LISA, OwLore): the other layers'
    tensors stay frozen and are not returned; None trains every layer.
    """
    received = arrays
    ledger = open_ledger(config, identity)  # first: a corrupted ledger stops the round before any data is read
    data = client_data(config, identity.partition_id, identity.num_partitions)
    check_privacy_plan(config, len(data.train))  # a ConfigError before anything is charged
    sample_rate = poisson_sample_rate(len(data.train), config.batch_size)
    noise = noise_for(config, sample_rate)
    step = PrivacyStep(server_round, noise or 0.0, sample_rate, config.local_steps)
    if noise is not None:
        if not ledger.allows(step):
            reason = (f"budget: round {server_round} would spend epsilon {ledger.epsilon_if(step):.3f} "
                      f"> target {config.target_epsilon}")
            return TrainOutcome(arrays={}, metrics=_metrics(0, ledger, refused=True), ledger=ledger.to_dict(),
                                refused=True, reason=reason)
        ledger.open_round(step)  # each step is counted on disk before it runs (train_locally's before_step)

    adapted = build_model(config, num_labels=len(data.train.label_names))
    if fold:
        arrays = fold_into_base(adapted.model, arrays)
    if config.rank_growth != "none":  # the server grew some layers' ranks (server/rank_growth.py): take its shapes
        fit_ranks(adapted.model, arrays)
    load_state(adapted.model, arrays, leading_block=True)
    load_personal(adapted.model, identity.personal_path, identity.run_dir, personal)
    for name, parameter in adapted.model.named_parameters():
        if any(part in frozen for part in name.split(".")):
            parameter.requires_grad_(False)
    if train_layers is not None:
        freeze_other_layers(adapted.model, train_layers)
    sent = [name for name in adapted.trainable if not any(part in personal for part in name.split("."))]
    result = train_locally(
        adapted.model, encode(adapted.tokenizer, data.train, config.max_seq_len),
        steps=config.local_steps, batch_size=config.batch_size, lr=config.lr,
        dp=DPSettings(noise_multiplier=noise, max_grad_norm=config.max_grad_norm,
                      grad_sample_mode=get_adapter(config.adapter).grad_sample_mode), device=pick_device(),
        before_step=ledger.count_step if noise is not None else None,
        **training_parts(config, adapted.model, server_round),
    )
    if noise is not None:
        ledger.close_round(result.steps)
    if personal:
        save_personal(adapted.model, identity.personal_path, identity.run_dir, personal)
    metrics = _metrics(len(data.train), ledger, refused=False)
    metrics.update({"train-loss": result.mean_loss, "first-loss": result.first_loss, "steps": result.steps,
                    "noise-multiplier": noise or 0.0, "sample-rate": result.sample_rate})
    if noise is None:
        metrics["epsilon"] = math.inf
    # GaLore on full weights: each ΔW's change goes as two rank-k factors
    trained = low_rank_payload(config, trainable_state(adapted.model, sent), received)
    return TrainOutcome(arrays=trained, metrics=metrics, ledger=ledger.to_dict(),
                        extra={"base-sha256": adapted.base_sha256})


def _metrics(num_examples: int, ledger: PrivacyLedger, refused: bool) -> dict:
    return {"num-examples": num_examples, "epsilon": ledger.epsilon(), "refused": int(refused),
            "train-loss": math.nan, "first-loss": math.nan, "steps": 0, "noise-multiplier": 0.0,
            "sample-rate": 0.0}


def evaluate_round(config: RunConfig, identity: ClientIdentity, arrays: dict[str, np.ndarray],
                   personal: tuple[str, ...] = ()) -> dict:
    """Loss and accuracy of the received global adapter on this client's local test split (with its own
    `personal` factors where it has them: FedSA-LoRA's personalized model)."""
    data = client_data(config, identity.partition_id, identity.num_partitions)
    adapted = build_model(config, num_labels=len(data.test.label_names))
    fit_ranks(adapted.model, arrays)
    load_state(adapted.model, arrays)
    load_personal(adapted.model, identity.personal_path, identity.run_dir, personal)
    loss, accuracy = evaluate(adapted.model, encode(adapted.tokenizer, data.test, config.max_seq_len),
                              config.eval_batch_size, pick_device())
    return {"num-examples": len(data.test), "eval-loss": loss, "eval-accuracy": accuracy}
