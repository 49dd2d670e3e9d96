"""Memory, reconstruction error and DP step time of every frozen base (issue 5), on MiniLM-L6 + LoRA.

Per base (run config `base`): the frozen base a client holds (every frozen tensor, `common.bases.checksum`)
and its linear layers alone (fp32 `nn.Linear` or packed `QuantizedLinear`, adapters included), the time to
build it, the relative error ‖W0 − W_base‖_F / ‖W0‖_F over the LoRA layers' weights (LQ-LoRA counts its
start Q + L1 L2; LoRAM's pruning is not an approximation of W0 and shows n/a), and the seconds per DP-SGD
step (Opacus hooks mode, Poisson batches, clipping and noise) on the toy data of the tests.

    python -m simulations.bench_bases [--steps 5] [--batch-size 16] [--seq-len 32] [--bases fp32,nf4,...]

Embeddings (30522 x 384 fp32, 44.7 MiB) are not linear layers and stay fp32 in every base, so the whole
model shrinks much less than its linear layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from client.dp_training import DPSettings, fresh_generator, train_locally
from common.adapters.lora import LoRALinear
from common.bases.replace import linear_weight_bytes
from common.config import BASES, RunConfig
from common.data.partition import client_data
from common.model import build_model, pick_device
from common.tensors import encode

MIB = 2**20


def relative_error(adapted, reference) -> float | None:
    """‖W0 − W‖_F / ‖W0‖_F over the LoRA layers (W = the base's weight plus the adapter's start ΔW)."""
    full = {n: m for n, m in reference.model.named_modules() if isinstance(m, LoRALinear)}
    layers = {n: m for n, m in adapted.model.named_modules() if isinstance(m, LoRALinear)}
    if adapted.index_maps is not None:
        return None
    num, den = 0.0, 0.0
    with torch.no_grad():
        for name, layer in layers.items():
            w0 = full[name].base.weight.double()
            w = layer.base.weight.double() + layer.delta_weight().double()
            num += float((w0 - w).square().sum())
            den += float(w0.square().sum())
    return (num / den) ** 0.5


def dp_seconds_per_step(config: RunConfig, adapted, data, steps: int) -> float:
    encoded = encode(adapted.tokenizer, data, config.max_seq_len)
    kwargs = dict(batch_size=config.batch_size, lr=config.lr, device=pick_device(),
                  dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
                  sampling_generator=fresh_generator(torch.device("cpu"), seed=0))
    model = adapted.model
    train_locally(model, encoded, steps=1, **kwargs)  # warm-up
    start = time.perf_counter()
    train_locally(model, encoded, steps=steps, **kwargs)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--bases", default=",".join(BASES))
    args = parser.parse_args()
    from tests.conftest import write_toy_csv

    path = write_toy_csv(Path(tempfile.mkdtemp(prefix="bench-bases-")), per_class=60)
    base = RunConfig(dataset=str(path), examples_per_class=0, rank=8, batch_size=args.batch_size,
                     max_seq_len=args.seq_len, strategy="fedsvd")
    data = client_data(base, 0, 1).train
    reference = build_model(base, num_labels=len(data.label_names))
    print("| base | frozen base MiB | linear layers MiB | build s | rel. error of LoRA layers | DP s/step |")
    print("|---|---|---|---|---|---|")
    for name in args.bases.split(","):
        config = dataclasses.replace(base, base=name)
        start = time.perf_counter()
        adapted = build_model(config, num_labels=len(data.label_names))
        built = time.perf_counter() - start
        error = relative_error(adapted, reference)
        step = dp_seconds_per_step(config, adapted, data, args.steps)
        print(f"| {name} | {adapted.base_bytes / MIB:.1f} | {linear_weight_bytes(adapted.model) / MIB:.1f} | "
              f"{built:.1f} | {'n/a' if error is None else f'{error:.4f}'} | {step:.3f} |", flush=True)


if __name__ == "__main__":
    main()
