"""Accuracy of each rank-heterogeneous strategy in a real `flwr` DP simulation (the README's table).

    python -m simulations.rank_hetero_table                      # 6 clients of ranks 4,4,8,8,16,16
    python -m simulations.rank_hetero_table --strategies flexlora,flora --rounds 2

Every strategy runs the same federation (same data split, same seed, same DP settings) through
`simulations.demo`; a homogeneous `fedsvd` run with every client at r_max is the reference row. Prints a
Markdown table and, as the last line, `final_accuracy` per strategy in key=value form.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from simulations.flower_sim import APP_DIR

HETERO = ("hetlora", "flexlora", "flora", "lora_lego", "fedsvd_het")


def run_one(strategy: str, ranks: str, r_max: int, args, out: Path) -> dict:
    run_dir = out / strategy
    settings = (f'strategy="{strategy}" rank={r_max} client-ranks="{ranks}" num-rounds={args.rounds} '
                f'clients-per-round={args.clients} local-steps={args.local_steps} max-seq-len={args.seq_len} '
                f'target-epsilon={args.epsilon} run-dir="{run_dir}"')
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "simulations.demo", "--num-clients", str(args.clients),
                             "--run-config", settings], cwd=APP_DIR, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-2000:] + result.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"error: the {strategy} run failed (exit {result.returncode})")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    rounds = metrics["rounds"]
    return {"strategy": strategy, "ranks": ranks or f"all {r_max}",
            "accuracy": [r.get("global-accuracy", float("nan")) for r in rounds],
            "trained": [r.get("clients-trained", 0) for r in rounds[1:]],
            "epsilon": max(c["epsilon"] for c in privacy["clients"]),
            "bytes_down": rounds[-1].get("bytes-down", 0), "bytes_up": rounds[-1].get("bytes-up", 0),
            "seconds": time.time() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(HETERO))
    parser.add_argument("--ranks", default="4,4,8,8,16,16", help="client-ranks (one per client)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the homogeneous fedsvd reference")
    parser.add_argument("--out", type=Path, default=APP_DIR / "runs" / "rank-hetero")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    args.clients, r_max = len(ranks), max(ranks)
    rows = []
    plan = [(s, args.ranks) for s in args.strategies.split(",") if s]
    if not args.no_reference:
        plan.append(("fedsvd", ""))
    for strategy, client_ranks in plan:
        print(f"running {strategy} ({client_ranks or f'all at rank {r_max}'}) ...", flush=True)
        rows.append(run_one(strategy, client_ranks, r_max, args, args.out))
        print(f"  accuracy by round {[round(a, 4) for a in rows[-1]['accuracy']]}", flush=True)
    print(f"\n{args.clients} clients, {args.rounds} rounds x {args.local_steps} DP steps, target epsilon "
          f"{args.epsilon}, r_max {r_max}\n")
    print("| strategy | client ranks | accuracy by round (0 = before training) | clients trained | max epsilon | "
          "bytes down / up (last round) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        acc = " → ".join(f"{a:.3f}" for a in row["accuracy"])
        print(f"| `{row['strategy']}` | {row['ranks']} | {acc} | {row['trained']} | {row['epsilon']:.2f} | "
              f"{row['bytes_down']:,} / {row['bytes_up']:,} | {row['seconds']:.0f} |")
    print(" ".join(f"{row['strategy']}={row['accuracy'][-1]:.3f}" for row in rows))


if __name__ == "__main__":
    main()
