"""A client's part of a private data-driven init (run config `init-data = "private"`: LoRA-SB, LoRA-GA).

One DP-SGD step on the full weights of the adapted layers: Poisson batch, per-sample clipping, Gaussian
noise, exactly as a training step and charged to the ledger as round 0 (the noise calibration counts
it, see `noise_for`). The noisy gradient is read off an SGD step with learning rate 1 (w - w' = g),
so Opacus' own noise and clipping produce it; everything the server does with it is post-processing.
"""

from __future__ import annotations

import math

from client.dp_training import DPSettings, train_locally
from client.train_round import ClientIdentity, TrainOutcome, _metrics, noise_for, open_ledger
from common.config import RunConfig
from common.data.partition import client_data
from common.gradient_init import train_base_weights_only
from common.model import build_model, pick_device
from common.privacy import PrivacyStep, poisson_sample_rate
from common.privacy.plan import check_privacy_plan
from common.tensors import encode

INIT_ROUND = 0


def init_round(config: RunConfig, identity: ClientIdentity) -> TrainOutcome:
    """{adapted layer: noisy mean gradient of its base weight}, or a refusal if the budget forbids it."""
    ledger = open_ledger(config, identity)  # first: a corrupted ledger stops the step before any data is read
    data = client_data(config, identity.partition_id, identity.num_partitions)
    check_privacy_plan(config, len(data.train))  # a ConfigError before anything is charged
    sample_rate = poisson_sample_rate(len(data.train), config.batch_size)
    noise = noise_for(config, sample_rate)
    step = PrivacyStep(INIT_ROUND, noise or 0.0, sample_rate, 1)
    if noise is not None:
        if not ledger.allows(step):
            reason = f"budget: the init step would spend epsilon {ledger.epsilon_if(step):.3f} > target"
            return TrainOutcome(arrays={}, metrics=_metrics(0, ledger, refused=True), ledger=ledger.to_dict(),
                                refused=True, reason=reason)
        ledger.charge(step)
    adapted = build_model(config, num_labels=len(data.train.label_names))
    weights = train_base_weights_only(adapted.model)
    before = {name: weight.detach().clone() for name, weight in weights.items()}
    result = train_locally(
        adapted.model, encode(adapted.tokenizer, data.train, config.max_seq_len), steps=1,
        batch_size=config.batch_size, lr=1.0, optimizer_name="sgd",
        dp=DPSettings(noise_multiplier=noise, max_grad_norm=config.max_grad_norm), device=pick_device(),
    )
    if noise is not None:
        ledger.settle(INIT_ROUND, result.steps)
    gradients = {name: (before[name] - weights[name].detach().cpu()).numpy() for name in weights}
    metrics = _metrics(len(data.train), ledger, refused=False)
    metrics.update({"first-loss": result.first_loss, "train-loss": result.mean_loss, "steps": result.steps,
                    "noise-multiplier": noise or 0.0, "sample-rate": result.sample_rate})
    if noise is None:
        metrics["epsilon"] = math.inf
    return TrainOutcome(arrays=gradients, metrics=metrics, ledger=ledger.to_dict())
