"""The server's side of a compressed base (issue 5): one base per run, its checksum, bytes and init.

- The server builds the base from the run config like every client (`common.model.build_model`), and
  takes its sha256 (`common.bases.checksum`) as the run's: for every base other than "fp32" a training
  reply whose `base-sha256` differs is refused (a fault, `LoRAStrategy._read_reply`).
- What a client holds once (the frozen base's bytes) is reported once, in metrics.json `base` and the log;
  the per-round traffic is the rounds' `bytes-up` / `bytes-down`.
- `base-init = "eora"`: the initial LoRA is EoRA's compensation, computed here on the public split. For
  "qloram" the start B0 A0 is kept in RUN_DIR/eora_start.safetensors: the full model (evaluation, export)
  gets only the trained change s (B A - B0 A0) (`common.bases.eora_init`).
- LoRAM / QLoRAM: the clients train on the pruned base; `full_model` builds the full-precision model
  the recovered adapter is served (evaluated, exported) on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from common.bases.eora_init import calibration_reference, lora_factors, trained_change
from common.bases.pruning import recover_arrays
from common.config import RunConfig
from common.errors import FedloraError
from common.logs import get_logger
from common.model import AdaptedModel, build_model, pick_device
from common.payload import trainable_state

log = get_logger("server")
MIB = 2**20
EORA_START = "eora_start.safetensors"


def full_precision(config: RunConfig) -> RunConfig:
    """The same run on the full-precision, unpruned base (what LoRAM serves, what export merges into)."""
    return dataclasses.replace(config, base="fp32", base_init="none", lq_bits=0.0, lq_fisher="none")


def full_model(config: RunConfig, num_labels: int) -> AdaptedModel | None:
    """LoRAM / QLoRAM: the full-precision model of the same adapters at full shapes; None for other bases."""
    if config.base not in ("loram", "qloram"):
        return None
    return build_model(full_precision(config), num_labels)


def recovered(state: dict[str, np.ndarray], pruned: AdaptedModel, full: AdaptedModel,
              start: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A pruned-space global state recovered to the full model's shapes (zeros at pruned positions); with
    EoRA's `start`, only the trained change s (B A - B0 A0) is recovered."""
    shapes = {key: tuple(value.shape) for key, value in full.model.state_dict().items()}
    return recover_arrays(state if start is None else trained_change(state, start), pruned.index_maps, shapes)


def needs_start(config: RunConfig) -> bool:
    """Does serving subtract EoRA's start (QLoRAM with EoRA: the full W0 has no NF4 error)?"""
    return config.base == "qloram" and config.base_init == "eora"


def load_start(config: RunConfig, run_dir: Path) -> dict[str, np.ndarray] | None:
    """EoRA's start B0, A0 of a "qloram" EoRA run (RUN_DIR/eora_start.safetensors); None for other runs."""
    if not needs_start(config):
        return None
    path = Path(run_dir) / EORA_START
    if not path.is_file():
        raise FedloraError(f"{path} is missing: a qloram run with base-init = 'eora' serves W0 plus the trained "
                           f"change B A - B0 A0 and needs the start B0 A0 its server wrote in round 0")
    return load_file(str(path))


def prepare_base(config: RunConfig, adapted: AdaptedModel, strategy, fresh: bool) -> dict:
    """Arm the strategy's checksum check, run EoRA's init on a fresh run; the base summary for metrics.json."""
    if config.base != "fp32":
        strategy.base_checksum = adapted.base_sha256
    summary = {"name": config.base, "init": config.base_init, "sha256": adapted.base_sha256,
               "bytes": adapted.base_bytes}
    log.info("frozen base %s: %.1f MiB per client, once (sha256 %s...)", config.base, adapted.base_bytes / MIB,
             adapted.base_sha256[:16])
    if config.base_init == "eora" and fresh:
        from common.bases.eora_init import eora_initialise
        from common.data.partition import public_split
        from common.tensors import encode

        data = public_split(config)
        reference = build_model(calibration_reference(config), num_labels=adapted.model.config.num_labels)
        layers = eora_initialise(adapted.model, reference.model, encode(adapted.tokenizer, data, config.max_seq_len),
                                 config.eval_batch_size, pick_device())
        log.info("EoRA init of %d LoRA layers: calibrated on the server's public split (%d examples, no privacy "
                 "cost)", len(layers), len(data))
        summary["calibration-examples"] = len(data)
        if needs_start(config):
            factors = [name for name, _ in adapted.model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
            save_file(lora_factors(trainable_state(adapted.model, factors)), str(Path(strategy.run_dir) / EORA_START))
    return summary
