"""Merge the clients' own adapters of a finished run into one LoRA (end-of-training merge).

    python -m server.merge RUN_DIR [--method lego|flexlora] [--rank R] [--out DIR]

RUN_DIR/clients/ holds each client's last accepted LoRA reply (written by the ServerApp for strategies
whose clients send both factors). The merge weights clients by their example counts: `lego` clusters
the rank-1 units (LoRA-LEGO, `server/lego.py`), `flexlora` takes the best rank-R approximation of the
mean product (`server/rank_merging.py`). Heads are averaged. DIR (default RUN_DIR/merged-<method>) gets
adapter.safetensors, run_config.json and labels.json, so `python -m server.export DIR` turns it into a
model. Only DP outputs are read: the merge costs no privacy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

from common.config import finished_run_config
from common.errors import FedloraError, exit_on_user_error
from common.ranks import config_for_rank
from server.aggregation import A_SUFFIX, lora_layer_keys, mean_of_non_lora
from server.lego import lego_merge
from server.rank_merging import flexlora_merge

MERGES: dict[str, Callable] = {"lego": lego_merge, "flexlora": flexlora_merge}


def load_client_adapters(run_dir: Path) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    files = sorted((run_dir / "clients").glob("client-*.safetensors"))
    if not files:
        raise FedloraError(f"{run_dir / 'clients'} has no client adapters: runs whose clients send both LoRA "
                           "factors leave them (strategies fedavg_lora, hetlora, flexlora, lora_lego)")
    weights = []
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            weights.append(float((handle.metadata() or {}).get("num-examples", 1.0)))
    return [load_file(str(path)) for path in files], weights


def merge_adapters(adapters: list[dict[str, np.ndarray]], weights: list[float], method: str, rank: int
                   ) -> dict[str, np.ndarray]:
    """Every LoRA layer merged by `method` to `rank`; every other tensor (the head) example-weighted."""
    if method not in MERGES:
        raise FedloraError(f"unknown merge method {method!r}; available: {', '.join(sorted(MERGES))}")
    keys = set(adapters[0])
    if any(set(a) != keys for a in adapters):
        raise FedloraError("the client adapters hold different tensors; were they written by one run?")
    out = mean_of_non_lora(adapters, weights)
    for a_key, b_key in lora_layer_keys(keys):
        d_out, d_in = adapters[0][b_key].shape[0], adapters[0][a_key].shape[1]
        if rank > min(d_out, d_in):
            raise FedloraError(f"rank {rank} exceeds layer {a_key[: -len(A_SUFFIX)]} ({d_out} x {d_in})")
        out[b_key], out[a_key] = MERGES[method]([a[b_key] for a in adapters], [a[a_key] for a in adapters],
                                                weights, rank)
    return out


def start_of_run(run_dir: Path, config, rank: int) -> dict[str, np.ndarray]:
    """PiSSA / LoRA-GA: the clients trained on W0 - s B0 A0 at the run's rank, so the merge keeps that rank and
    the run's start (LoRA-GA's B0, A0 are in the global adapter; PiSSA's are rebuilt from W0 by export)."""
    from safetensors.numpy import load_file

    if rank != config.rank:
        raise FedloraError(f"--rank {rank}: lora-init = {config.lora_init!r} trained every client on the base "
                           f"W0 - s B0 A0 of rank {config.rank}; merge at --rank {config.rank}")
    return {k: v for k, v in load_file(str(run_dir / "adapter.safetensors")).items() if ".lora_init_" in k}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from safetensors.numpy import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory of a finished run")
    parser.add_argument("--method", default="lego", choices=sorted(MERGES), help="how to merge (default lego)")
    parser.add_argument("--rank", type=int, help="rank of the merged LoRA (default: the run's rank)")
    parser.add_argument("--out", type=Path, help="output directory (default RUN_DIR/merged-<method>)")
    args = parser.parse_args(argv)
    config = finished_run_config(args.run_dir)
    rank = args.rank or config.rank
    if rank < 1:
        raise FedloraError(f"--rank = {rank} is invalid: give an integer >= 1")
    adapters, weights = load_client_adapters(args.run_dir)
    try:
        merged = merge_adapters(adapters, weights, args.method, rank)
    except ValueError as err:
        raise FedloraError(f"cannot merge: {err}") from None
    if config.lora_init != "default":
        merged.update(start_of_run(args.run_dir, config, rank))
    out = args.out or args.run_dir / f"merged-{args.method}"
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "adapter.safetensors"))
    merged_config = config_for_rank(config, rank)
    (out / "run_config.json").write_text(json.dumps({**merged_config.to_flower(), "run-dir": str(out)}, indent=2))
    (out / "labels.json").write_text((args.run_dir / "labels.json").read_text())
    print(f"merged {len(adapters)} client adapters ({args.method}, rank {rank}): {out}")


if __name__ == "__main__":
    main()
