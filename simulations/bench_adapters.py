"""Every registered adapter on the default model: DP step cost, trainable size, bytes per round, accuracy.

For each adapter: seconds per local step with and without Opacus DP-SGD (same model, batch, sequence
length; see `bench_dp_step`), trainable parameters (adapter + head), bytes a client sends per round
(float32 payload under `fedavg_lora`), and, with `--federated`, the global accuracy after a short
federated DP run (the demo's simulation, 2 clients, IID) . Target: DP step ratio <= 1.10 for every adapter.

    python -m simulations.bench_adapters [--adapters lora,svfit] [--steps 10] [--repeats 2] [--federated]

The last line is `worst_dp_step_ratio=<max over adapters>`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common.adapters import ADAPTERS
from common.config import RunConfig
from common.data.partition import client_data
from common.model import build_model
from common.payload import trainable_state
from simulations.bench_dp_step import compare_modes

FEDERATED = {"num-rounds": 2, "clients-per-round": 2, "local-steps": 5, "examples-per-class": 100,
             "max-seq-len": 32, "target-epsilon": 8.0, "partitioner": "iid", "strategy": "fedavg_lora"}


def federated_accuracy(adapter: str) -> float:
    """Global test accuracy after the short federated DP run in `FEDERATED`."""
    from simulations.flower_sim import flwr_run, simulation_superlink

    from common.diffora_selection import resolve_diffora_modules

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{adapter}-"))
    overrides = {**FEDERATED, "adapter": adapter, "run-dir": str(run_dir)}
    _, overrides = resolve_diffora_modules(RunConfig.from_flower(overrides), overrides)  # DiffoRA's selection
    with simulation_superlink() as env:
        code = flwr_run(env, overrides, num_supernodes=2)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"] if code == 0 else []
    return rounds[-1].get("global-accuracy", float("nan")) if rounds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default=",".join(sorted(ADAPTERS)), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--federated", action="store_true", help="also run a short federated DP run each")
    args = parser.parse_args()
    names = [n.strip() for n in args.adapters.split(",") if n.strip()]
    unknown = [n for n in names if n not in ADAPTERS]
    if unknown:
        parser.error(f"unknown adapter(s) {', '.join(unknown)}; available: {', '.join(sorted(ADAPTERS))}")

    rows = []
    for name in names:
        config = RunConfig(adapter=name, batch_size=args.batch_size, max_seq_len=args.seq_len)
        data = client_data(config, 0, 1).train
        payload = trainable_state(build_model(config, num_labels=len(data.label_names)).model)
        plain, private = compare_modes(config, data, args.steps, args.warmup, args.repeats, trim=False,
                                       label=f"{name}: ")
        accuracy = federated_accuracy(name) if args.federated else float("nan")
        rows.append((name, sum(v.size for v in payload.values()), sum(v.nbytes for v in payload.values()),
                     plain, private, accuracy))

    print(f"\n{'adapter':<10} {'trainable':>10} {'bytes/round':>12} {'non-DP ms':>10} {'DP ms':>8} {'ratio':>6} "
          f"{'accuracy':>8}")
    for name, params, nbytes, plain, private, accuracy in rows:
        print(f"{name:<10} {params:>10} {nbytes:>12} {plain * 1000:>10.1f} {private * 1000:>8.1f} "
              f"{private / plain:>6.3f} {accuracy:>8.4f}")
    print(f"worst_dp_step_ratio={max(private / plain for *_, plain, private, _ in rows):.3f}")


if __name__ == "__main__":
    main()
