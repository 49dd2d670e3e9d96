"""Server time and memory to merge one layer from rank-heterogeneous clients, against two baselines.

K clients adapt a square d x d layer with ranks drawn uniformly from {4, 8, 16, 32} (r_max = 32, float32
factors, seeded). Timed: FlexLoRA (`flexlora_merge`, method "auto": the randomized SVD once R = Σ r_k
exceeds `RANDOMIZED_ABOVE`), heterogeneous FedSVD (`hetero_fedsvd_merge`), HetLoRA (`hetlora_merge`) and
FLoRA (`flora_stack`, max_rank = r_max), against (a) the dense reference, Σ p_k B_k A_k formed as a d x d
float64 matrix and truncated by `np.linalg.svd`, and (b) plain averaging of K same-rank payloads
{"A": r_max x d, "B": d x r_max} with `server.aggregation.weighted_mean`, the cost FedAvg pays.

    python -m simulations.bench_aggregation [--quick] [--clients 10,100] [--dims 768,4096] [--seed 0]
        [--repeats 3] [--passes 3] [--skip-dense]

Times are the best of `--repeats` runs (1 run for the dense reference at d >= 4096, where it takes tens
of seconds); peak memory is tracemalloc's peak over the first run (numpy reports its buffers to
tracemalloc), minus what was allocated before. One line per setting; the last line is
`worst_vs_avg=X.X min_speedup_vs_dense=Y`: the largest time / plain-averaging time of FlexLoRA and
heterogeneous FedSVD over all settings, and the smallest dense time / FlexLoRA time.
Targets: at K=100, d=4096, FlexLoRA and heterogeneous FedSVD cost <= 3x plain averaging, and FlexLoRA is
>= 50x faster than dense. Two things to know when reading the ratios:
- With K=10, plain averaging takes a few ms, while the exact route pays a fixed cost (two thin Householder
  QRs of d x R in LAPACK, which runs at a few GFLOP/s on such shapes, plus an R x R SVD): its ratio to
  averaging is large although it takes tens of ms. At d=768 the dense SVD is cheap too (~0.3 s).
- The randomized route (R > RANDOMIZED_ABOVE) applies M or Mᵀ `--passes` times, each two float32 GEMMs of
  d x R x (r_max + 10), about 1 GFLOP per pass at K=100, d=4096, plus one copy of every client's factors
  into the stacks; averaging is one memory-bound pass over twice as many numbers (all at rank r_max).
Timings on a shared 2-core machine vary by 2x between runs; multi-threaded BLAS suffers most when
another process competes for the cores. `OPENBLAS_NUM_THREADS=1` gives steadier (slower) numbers.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

from server.aggregation import weighted_mean
from server.rank_merging import (
    RANDOMIZED_ABOVE,
    flexlora_merge,
    flora_stack,
    hetero_fedsvd_merge,
    hetlora_merge,
    normalized,
)

RANKS = (4, 8, 16, 32)
METHODS = ("avg", "flexlora", "fedsvd_het", "hetlora", "flora", "dense")


def measure(function, repeats: int) -> tuple[float, float]:
    """(best wall time in s, peak MiB allocated during the first call, which runs under tracemalloc)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    function()
    times = [time.perf_counter() - start]
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    for _ in range(repeats - 1):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), peak / 2**20


def dense_reference(bs, as_, weights, rank):
    """Form Σ p_k B_k A_k densely in float64 and truncate its SVD: what the factor routes avoid."""
    p = normalized(weights)
    total = np.zeros((bs[0].shape[0], as_[0].shape[1]))
    for b, a, p_k in zip(bs, as_, p, strict=True):
        total += p_k * (b.astype(np.float64) @ a.astype(np.float64))
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32)


def run_setting(clients: int, d: int, rng: np.random.Generator, repeats: int, methods: tuple[str, ...],
                passes: int) -> dict[str, tuple[float, float]]:
    r_max = max(RANKS)
    ranks = rng.choice(RANKS, size=clients)
    weights = rng.integers(100, 1000, size=clients).astype(float).tolist()
    bs = [(rng.standard_normal((d, r)) / np.sqrt(r)).astype(np.float32) for r in ranks]
    as_ = [(rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float32) for r in ranks]
    b_global = (rng.standard_normal((d, r_max)) / np.sqrt(r_max)).astype(np.float32)
    a_global = np.linalg.qr(rng.standard_normal((d, r_max)))[0].T.astype(np.float32)
    payloads = [{"A": rng.standard_normal((r_max, d)).astype(np.float32),
                 "B": rng.standard_normal((d, r_max)).astype(np.float32)} for _ in range(clients)]
    fedsvd_bs = [b_global[:, :r] + 0.01 * b[:, :r] for b, r in zip(bs, ranks, strict=True)]
    routes = {
        "avg": lambda: weighted_mean(payloads, weights),
        "flexlora": lambda: flexlora_merge(bs, as_, weights, r_max, passes=passes),
        "fedsvd_het": lambda: hetero_fedsvd_merge(fedsvd_bs, b_global, a_global, weights, r_max),
        "hetlora": lambda: hetlora_merge(bs, as_, weights, r_max),
        "flora": lambda: flora_stack(b_global, a_global, bs, as_, weights, max_rank=r_max, passes=passes),
        "dense": lambda: dense_reference(bs, as_, weights, r_max),
    }
    results = {}
    for name in methods:
        results[name] = measure(routes[name], 1 if name == "dense" and d >= 4096 else repeats)
    return results | {"R": (float(sum(ranks)), 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting (K=10, d=256) for a smoke test")
    parser.add_argument("--clients", default="10,100", help="comma-separated K values")
    parser.add_argument("--dims", default="768,4096", help="comma-separated d values (square d x d layers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3,
                        help="products with M or Mᵀ in the randomized SVD (FlexLoRA and FLoRA above RANDOMIZED_ABOVE)")
    parser.add_argument("--skip-dense", action="store_true", help="do not time the (slow) dense reference")
    args = parser.parse_args()
    clients = [10] if args.quick else [int(k) for k in args.clients.split(",")]
    dims = [256] if args.quick else [int(d) for d in args.dims.split(",")]

    rng = np.random.default_rng(args.seed)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    methods = METHODS[:-1] if args.skip_dense else METHODS
    print(f"ranks ~ U{list(RANKS)}, r_max={max(RANKS)}, float32, best of {args.repeats}, BLAS threads {threads}, "
          f"randomized SVD passes {args.passes}, RANDOMIZED_ABOVE={RANDOMIZED_ABOVE}")
    print(f"{'K':>4} {'d':>5} {'R':>5} | time ms: " + " ".join(f"{m:>10}" for m in methods)
          + " | peak MiB: " + " ".join(f"{m:>8}" for m in methods)
          + " | flex/avg fsvd/avg dense/flex", flush=True)
    worst_vs_avg, min_speedup = 0.0, float("inf")
    for k in clients:
        for d in dims:
            res = run_setting(k, d, rng, args.repeats, methods, args.passes)
            t = {m: res[m][0] for m in methods}
            flex_avg, fsvd_avg = t["flexlora"] / t["avg"], t["fedsvd_het"] / t["avg"]
            speedup = t["dense"] / t["flexlora"] if "dense" in t else float("nan")
            worst_vs_avg = max(worst_vs_avg, flex_avg, fsvd_avg)
            min_speedup = min(min_speedup, speedup) if "dense" in t else min_speedup
            print(f"{k:>4} {d:>5} {int(res['R'][0]):>5} | time ms: "
                  + " ".join(f"{t[m] * 1000:>10.2f}" for m in methods)
                  + " | peak MiB: " + " ".join(f"{res[m][1]:>8.1f}" for m in methods)
                  + f" | {flex_avg:>8.2f} {fsvd_avg:>8.2f} {speedup:>10.0f}", flush=True)
    dense = "skipped" if args.skip_dense else f"{min_speedup:.0f}"
    print(f"worst_vs_avg={worst_vs_avg:.1f} min_speedup_vs_dense={dense}")


if __name__ == "__main__":
    main()
