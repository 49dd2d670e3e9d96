"""Local personalization after a federated run: a private LoRA on top of the final global, on one client.

    python -m client.personalize RUN_DIR --client ID --num-clients N [--steps S] [--lr LR] [--dp [--dp-epsilon E]]

1. Start from the final global model: W0 + s B_g A_g folded into the base weights of every adapted layer, the
   global head loaded (`RUN_DIR/adapter.safetensors`). In a `fedsa_lora` run the global holds no B: the
   client's own personal B (kept beside its ledger, client/personal_state.py) is folded with the shared A.
2. A fresh LoRA of the run's rank and target modules (A at its seeded init, B = 0, so the model starts as the
   global one) and the head train for `--steps` steps on the client's own training split.
3. Both models are evaluated on the client's local test split; the personal adapter (its LoRA and head, to
   add on top of the folded global) goes to `RUN_DIR/personal/client-ID.safetensors`, the figures to
   `client-ID.json`. Nothing is sent anywhere.

Privacy. By default the personal adapter trains without DP and nothing is written to the ledger: the
federation's guarantee is about what the client released (its DP replies), and post-processing those with
data that never leaves the client releases nothing more, so the accounting is unchanged. But the personal
adapter is itself a function of the client's private data, with no guarantee: it must stay on the client
(sharing it, or a model or predictions built from it, would leak that data). `--dp` trains it under DP-SGD
instead and charges the client's ledger: one row at round max(num-rounds, the ledger's last round) + 1, noise
calibrated so that the whole history stays within target-epsilon + `--dp-epsilon` (the ledger's target is
raised by that much, as LoKU does). Then the adapter may be shared at that stated cost.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.dp_training import DPSettings, train_locally
from client.personal_state import personal_path, read_personal
from common.config import RunConfig, finished_run_config
from common.errors import ConfigError, exit_on_user_error
from common.privacy import PrivacyLedger, PrivacyStep, poisson_sample_rate
from common.privacy.ledger import noise_within_budget

PERSONAL = "personal"


@dataclass
class PersonalOutcome:
    arrays: dict[str, np.ndarray]  # the personal LoRA and head, on top of the folded global
    metrics: dict

# Measured once (README, Personalization): 30 steps at 0.003 took client 0 from 0.165 to 0.661 local accuracy.
DEFAULT_LR = 0.003


def check_personalizable(config: RunConfig) -> None:
    """Folding the global into the base needs plain LoRA factors and a base stored in full precision."""
    from common.bases.registry import get_base

    if config.adapter != "lora":
        raise ConfigError(f"personalization folds the global LoRA into the base weights; this run has adapter "
                          f"{config.adapter!r}: it works with adapter = 'lora' only")
    if get_base(config.base).quantized or config.base == "lq_lora":
        raise ConfigError(f"personalization folds the global LoRA into the base weights, which base = "
                          f"{config.base!r} stores quantized (folding would need re-quantization): it works with "
                          f"base = 'fp32' or 'loram'")


def personalized_model(config: RunConfig, global_arrays: dict[str, np.ndarray], num_labels: int,
                       personal: dict[str, np.ndarray] | None = None):
    """The run's model with the global folded into its base and a fresh LoRA (or the given `personal` one)."""
    from common.adapters.rank_resize import fold_into_base
    from common.model import build_model
    from common.payload import load_state

    adapted = build_model(config, num_labels=num_labels)
    load_state(adapted.model, fold_into_base(adapted.model, global_arrays))  # what is left: the global head
    if personal is not None:
        load_state(adapted.model, personal)
    return adapted


def calibrate_personal_noise(ledger: PrivacyLedger, step_round: int, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1%) whose row keeps the ledger's whole history within its target."""
    noise = noise_within_budget(ledger, lambda sigma: [PrivacyStep(step_round, sigma, sample_rate, steps)])
    if noise is None:
        raise ConfigError(f"client {ledger.client_id}: DP personalization does not fit the budget: epsilon "
                          f"{ledger.epsilon():.3f} is already spent of {ledger.target_epsilon:g} (target-epsilon + "
                          f"--dp-epsilon); raise --dp-epsilon or fewer --steps")
    return noise


def personalize(config: RunConfig, run_dir: Path, client_id: str, partition_id: int, num_partitions: int,
                ledger_dir: Path, *, steps: int, lr: float, dp: bool = False, dp_epsilon: float = 1.0
                ) -> PersonalOutcome:
    """Steps 1-3 of the module docstring for one client; with `dp`, its ledger is charged first."""
    from safetensors.numpy import load_file

    from common.data.partition import client_data
    from common.evaluation import evaluate
    from common.model import pick_device
    from common.payload import trainable_state
    from common.tensors import encode

    check_personalizable(config)
    global_arrays = load_file(str(run_dir / "adapter.safetensors"))
    # fedsa_lora: the client's own B of this run completes the shared A (other strategies leave no such file)
    own = read_personal(personal_path(ledger_dir, client_id), str(run_dir.resolve()))
    global_arrays = {**global_arrays, **(own or {})}
    data = client_data(config, partition_id, num_partitions)
    adapted = personalized_model(config, global_arrays, len(data.train.label_names))
    device = pick_device()
    train, test = (encode(adapted.tokenizer, split, config.max_seq_len) for split in (data.train, data.test))
    global_loss, global_accuracy = evaluate(adapted.model, test, config.eval_batch_size, device)

    noise, ledger, step_round = None, None, None
    sample_rate = poisson_sample_rate(len(data.train), config.batch_size)
    if dp:
        if not math.isfinite(config.target_epsilon):
            raise ConfigError("--dp charges the client's ledger, but this run was not private (target-epsilon = "
                              "inf): there is no budget to charge; leave out --dp")
        ledger = PrivacyLedger(ledger_dir / f"client-{client_id}.json", client_id,
                               config.target_epsilon + dp_epsilon, config.delta, config.accountant)
        step_round = max([config.num_rounds, *(row.round for row in ledger.history)]) + 1
        noise = calibrate_personal_noise(ledger, step_round, sample_rate, steps)
        ledger.open_round(PrivacyStep(step_round, noise, sample_rate, steps))
    result = train_locally(adapted.model, train, steps=steps, batch_size=config.batch_size, lr=lr,
                           dp=DPSettings(noise, config.max_grad_norm), device=device,
                           before_step=ledger.count_step if ledger is not None else None)
    if ledger is not None:
        ledger.close_round(result.steps)
    loss, accuracy = evaluate(adapted.model, test, config.eval_batch_size, device)
    metrics = {"client": client_id, "strategy": config.strategy, "steps": result.steps, "lr": lr,
               "train-examples": len(data.train), "test-examples": len(data.test),
               "first-loss": result.first_loss, "train-loss": result.mean_loss,
               "global-accuracy": global_accuracy, "global-loss": global_loss,
               "personal-accuracy": accuracy, "personal-loss": loss,
               "own-personal-factors": own is not None, "dp": dp}
    if ledger is not None:
        metrics.update({"ledger-round": step_round, "noise-multiplier": noise, "sample-rate": sample_rate,
                        "epsilon": ledger.epsilon(), "epsilon-budget": ledger.target_epsilon})
    return PersonalOutcome(trainable_state(adapted.model), metrics)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from safetensors.numpy import save_file

    parser = argparse.ArgumentParser(description="Train a private local LoRA on top of a run's final global "
                                                 "adapter, on one client's data; it is never sent anywhere.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--client", required=True, help="client id (= partition id in simulations)")
    parser.add_argument("--num-clients", type=int, required=True, help="number of partitions of the federation")
    parser.add_argument("--steps", type=int, default=30, help="local training steps (default 30)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"learning rate (default {DEFAULT_LR}: without DP noise the run's 0.03 is too high)")
    parser.add_argument("--dp", action="store_true", help="train under DP-SGD and charge the client's ledger")
    parser.add_argument("--dp-epsilon", type=float, default=1.0,
                        help="with --dp: epsilon it may spend beyond target-epsilon (default 1.0)")
    parser.add_argument("--ledger-dir", type=Path, help="where the client's ledger is (default RUN_DIR/ledgers)")
    args = parser.parse_args(argv)
    if args.steps < 1 or not 0 <= args.dp_epsilon < math.inf or not args.lr > 0:
        raise ConfigError("--steps must be >= 1, --lr > 0 and --dp-epsilon >= 0 (finite)")
    config = finished_run_config(args.run_dir, "adapter.safetensors")
    outcome = personalize(config, args.run_dir, args.client, int(args.client), args.num_clients,
                          args.ledger_dir or args.run_dir / "ledgers", steps=args.steps,
                          lr=args.lr, dp=args.dp, dp_epsilon=args.dp_epsilon)
    out = args.run_dir / PERSONAL
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"client-{args.client}.safetensors"
    save_file(outcome.arrays, str(path), metadata={"on-top-of": "adapter.safetensors folded into the base",
                                                   "dp": str(args.dp).lower()})
    path.with_suffix(".json").write_text(json.dumps(outcome.metrics, indent=2))
    m = outcome.metrics
    privacy = (f"DP-SGD, ledger round {m['ledger-round']}, epsilon {m['epsilon']:.3f} of {m['epsilon-budget']:g}"
               if args.dp else "no DP, nothing charged: keep it on this client")
    print(f"client {args.client}: {m['steps']} local steps, loss {m['first-loss']:.3f} -> {m['train-loss']:.3f} "
          f"({privacy})")
    print(f"local test accuracy ({m['test-examples']} examples): global {m['global-accuracy']:.4f} -> personalized "
          f"{m['personal-accuracy']:.4f}")
    print(f"personal adapter: {path}")


if __name__ == "__main__":
    main()
