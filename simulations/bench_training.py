"""Every training procedure of `common/training/` on the default model: memory, DP step cost, bytes, accuracy.

For each procedure (an update rule, rank schedule, loss or init, as run-config overrides on LoRA under
`fedavg_lora`, so both factors train; or full-weight training of the same matrices, adapter `full`, with
LISA / OwLore's layer sampling at round 1's draw): seconds per local step with and without Opacus DP-SGD,
built exactly as a client round builds them (`client.train_round.training_parts`: the run's update rule, step
pieces and loss), the update rule's state after the steps (Adam's moments, GaLore's projected moments, ...), the peak
resident memory of the process that ran it (one fresh process per procedure, so the figures do not mix),
the bytes a client sends per round (after the steps, so GaLore's low-rank factor pairs on full weights), and
with `--federated` the global accuracy and loss after a short federated DP run (`FEDERATED`: a real `flwr run`
simulation, 2 clients, IID, 3 rounds of 10 steps at epsilon 8, settings below); `--federated-only` runs just that.

    python -m simulations.bench_training [--procedures adam,galore] [--steps 5] [--repeats 2] [--federated]
    python -m simulations.bench_training --federated-only > accuracy.jsonl

Timings are only comparable on a quiet machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> run-config overrides (on top of the LoRA defaults; strategy fedavg_lora: nothing frozen)
PROCEDURES: dict[str, dict] = {
    "adam": {},
    "sgd": {"update-rule": "sgd", "lr": 0.1},
    "galore": {"update-rule": "galore"},
    "galore-dct": {"update-rule": "galore", "galore-projection": "dct"},
    "frugal": {"update-rule": "frugal"},
    "lora_pro": {"update-rule": "lora_pro"},
    "dylora": {"rank-schedule": "dylora"},
    "sora": {"adapter": "sora"},
    "ba_lora": {"loss": "ba_lora"},
    "ggpo": {"ggpo-rho": 0.05},
    "pissa": {"lora-init": "pissa"},
    "allora": {"adapter": "allora"},
    "codyra": {"adapter": "codyra"},
    "sara": {"adapter": "sara", "lr": 1e-4},
    # full-weight training of the same query and value matrices (adapter "full": a dense ΔW each), at a
    # full-fine-tuning learning rate; LISA and OwLore train 2 of the 6 layers a round and send only those
    "full": {"adapter": "full", "lr": 1e-4},
    "galore-full": {"adapter": "full", "update-rule": "galore", "lr": 1e-4},
    "frugal-full": {"adapter": "full", "update-rule": "frugal", "lr": 1e-4},
    "lisa": {"adapter": "full", "layer-sampling": "lisa", "lr": 1e-4},
    "owlore": {"adapter": "full", "layer-sampling": "owlore", "update-rule": "galore", "lr": 1e-4},
}
# The accuracy column's run (`federated_result`): 2 clients (IID), 3 rounds of 10 DP steps at epsilon 8, 200
# examples per class, a real `flwr run` simulation. LoRA-based rows run under ffa_lora at the default lr 0.03, the
# strategy and lr that learn fastest in this budget (0.37 global accuracy for Adam, against 0.225 for fedavg_lora
# at lr 0.003); the full-weight rows (adapter full, sara) under fedavg_lora at lr 1e-3. The head always steps at
# 0.03 (`head-lr`): at a full-weight lr the head alone would not move (0.06 at lr 1e-4 without it).
FEDERATED = {"num-rounds": 3, "clients-per-round": 2, "local-steps": 10, "examples-per-class": 200,
             "batch-size": 32, "max-seq-len": 32, "target-epsilon": 8.0, "partitioner": "iid",
             "strategy": "ffa_lora", "lr": 0.03, "head-lr": 0.03}
FULL_WEIGHT_FEDERATED = {"strategy": "fedavg_lora", "lr": 1e-3}


def federated_settings(name: str) -> dict:
    """The accuracy run's settings for one procedure: `FEDERATED`, the procedure's own, then the full-weight ones."""
    own = {k: v for k, v in PROCEDURES[name].items() if k != "lr"}
    full_weight = own.get("adapter") in ("full", "sara")
    return {**FEDERATED, **own, **(FULL_WEIGHT_FEDERATED if full_weight else
                                   {"lr": PROCEDURES[name].get("lr", FEDERATED["lr"])})}


def measure(name: str, steps: int, warmup: int, repeats: int, batch_size: int, seq_len: int) -> dict:
    """One procedure, in this process: step times (median over alternating repeats), state, payload bytes."""
    import statistics
    import time

    import torch

    from client.dp_training import DPSettings, fresh_generator, train_locally
    from client.train_round import training_parts
    from common.config import RunConfig
    from common.data.partition import client_data
    from common.layer_sampling import drawn_layers, freeze_other_layers, layer_weights, layers_of
    from common.low_rank_upload import low_rank_payload
    from common.model import build_model, pick_device
    from common.payload import trainable_state
    from common.tensors import encode

    config = RunConfig.from_flower({**RunConfig(strategy="fedavg_lora", batch_size=batch_size,
                                                max_seq_len=seq_len).to_flower(), **PROCEDURES[name]})
    data = client_data(config, 0, 1).train
    device = pick_device()
    layers = None  # LISA / OwLore: round 1's draw, as the server makes it
    if config.layer_sampling != "none":
        names = build_model(config, num_labels=len(data.label_names)).trainable
        ids = layers_of(names)
        layers = drawn_layers(ids, layer_weights(config, ids), config.layers_per_round, config.seed, 1)
    modes = {"plain": None, "dp": 1.0}
    timings: dict[str, list[float]] = {mode: [] for mode in modes}
    state_bytes, payload_bytes = 0, 0
    for repeat in range(repeats):
        for mode in (list(modes) if repeat % 2 == 0 else list(reversed(modes))):
            adapted = build_model(config, num_labels=len(data.label_names))
            if layers is not None:
                freeze_other_layers(adapted.model, layers)
            encoded = encode(adapted.tokenizer, data, config.max_seq_len)

            def run(n: int, seed: int):
                parts = training_parts(config, adapted.model, server_round=1)
                return train_locally(adapted.model, encoded, steps=n, batch_size=config.batch_size, lr=config.lr,
                                     dp=DPSettings(noise_multiplier=modes[mode], max_grad_norm=1.0), device=device,
                                     trim_padding=False, sampling_generator=fresh_generator(torch.device("cpu"),
                                                                                            seed=seed), **parts)

            run(warmup, repeat)
            start_state = trainable_state(adapted.model)  # each run is a fresh round (its own optimizer)
            start = time.perf_counter()
            result = run(steps, repeat)
            # what a client would send after these steps: low-rank factor pairs under GaLore on full weights
            sent = low_rank_payload(config, trainable_state(adapted.model), start_state)
            payload_bytes = sum(v.nbytes for v in sent.values())
            timings[mode].append((time.perf_counter() - start) / steps)
            state_bytes = max(state_bytes, result.optimizer_state_bytes)
            print(f"  {name}: repeat {repeat + 1}/{repeats} {mode}: {timings[mode][-1] * 1000:.0f} ms/step",
                  file=sys.stderr, flush=True)
    plain, private = (statistics.median(timings[mode]) for mode in modes)
    return {"procedure": name, "plain_s": plain, "dp_s": private, "ratio": private / plain,
            "state_bytes": state_bytes, "payload_bytes": payload_bytes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def federated_result(name: str) -> dict:
    """Global test accuracy and loss before and after the short federated DP run in `FEDERATED` with the
    procedure's settings (NaN where the run failed)."""
    from simulations.flower_sim import flwr_run, simulation_superlink

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-training-{name}-"))
    with simulation_superlink() as env:
        code = flwr_run(env, {**federated_settings(name), "run-dir": str(run_dir)}, num_supernodes=2)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"] if code == 0 else []
    if not rounds:
        return {"accuracy": float("nan"), "loss": float("nan"), "loss_start": float("nan")}
    return {"accuracy": rounds[-1].get("global-accuracy", float("nan")),
            "loss": rounds[-1].get("global-loss", float("nan")),
            "loss_start": rounds[0].get("global-loss", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procedures", default=",".join(PROCEDURES), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--federated", action="store_true", help="also run a short federated DP run each")
    parser.add_argument("--federated-only", action="store_true",
                        help="only the federated accuracy (no step timings): one JSON line per procedure")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure one, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.repeats, args.batch_size, args.seq_len)))
        return
    names = [n.strip() for n in args.procedures.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROCEDURES]
    if unknown:
        parser.error(f"unknown procedure(s) {', '.join(unknown)}; available: {', '.join(PROCEDURES)}")
    if args.federated_only:
        for name in names:
            print(json.dumps({"procedure": name, **federated_result(name)}), flush=True)
        return
    rows = []
    for name in names:
        child = subprocess.run([sys.executable, "-m", "simulations.bench_training", "--one", name,
                                "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats",
                                str(args.repeats), "--batch-size", str(args.batch_size), "--seq-len",
                                str(args.seq_len)], stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            print(f"{name}: failed (exit {child.returncode}); see above", file=sys.stderr)
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row.update(federated_result(name) if args.federated else {"accuracy": float("nan"), "loss": float("nan")})
        rows.append(row)
    print(f"\n{'procedure':<11} {'non-DP ms':>9} {'DP ms':>7} {'ratio':>6} {'state MiB':>9} {'peak RSS MiB':>12} "
          f"{'MiB up/round':>12} {'accuracy':>8} {'loss':>6}")
    for r in rows:
        print(f"{r['procedure']:<11} {r['plain_s'] * 1000:>9.0f} {r['dp_s'] * 1000:>7.0f} {r['ratio']:>6.2f} "
              f"{r['state_bytes'] / 2**20:>9.2f} {r['peak_rss_mib']:>12.0f} {r['payload_bytes'] / 2**20:>12.2f} "
              f"{r['accuracy']:>8.4f} {r['loss']:>6.3f}")


if __name__ == "__main__":
    main()
