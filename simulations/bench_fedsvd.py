"""Server time to aggregate one adapted layer: plain averaging vs FedSVD (QR route) vs dense SVD.

K clients each send B (d x r); A (r x d) is the round's shared global A. All three methods first take
the example-weighted mean of the K B's (what every strategy does); FedSVD then re-orthogonalizes with a
thin QR of B̄ and Aᵀ plus an r x r SVD, and the dense reference takes the SVD of the d x d product.
Targets (issue 3): FedSVD costs at most 2x plain averaging and is at least 50x faster than dense.

    python -m simulations.bench_fedsvd [--clients 100] [--d 4096] [--rank 16] [--repeats 3] [--skip-dense]

The last line is `fedsvd_vs_avg=<t_fedsvd / t_avg> dense_vs_fedsvd=<t_dense / t_fedsvd>`.

The QR factors are tall and thin (d x r), where multi-threaded BLAS gains nothing and, on a busy machine,
loses a lot to contention: the FedSVD time then varies several-fold between runs. For stable numbers run
with `OPENBLAS_NUM_THREADS=1` (the header line shows the setting).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from server.aggregation import fedsvd_reorthogonalize, fedsvd_reorthogonalize_dense, weighted_mean


def best_time(function, repeats: int) -> float:
    """Minimum wall time of `repeats` calls (the least disturbed run)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100, help="K, clients whose B is averaged")
    parser.add_argument("--d", type=int, default=4096, help="d_in = d_out of the adapted layer")
    parser.add_argument("--rank", type=int, default=16, help="r, the LoRA rank")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is kept)")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed runs of the slow dense route")
    parser.add_argument("--skip-dense", action="store_true", help="do not time the dense SVD")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    payloads = [{"lora_B": rng.normal(size=(args.d, args.rank)).astype(np.float32)} for _ in range(args.clients)]
    weights = rng.integers(100, 1000, size=args.clients).astype(float).tolist()
    a = (rng.normal(size=(args.rank, args.d)) / np.sqrt(args.d)).astype(np.float32)

    def average():
        return weighted_mean(payloads, weights)["lora_B"]

    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"K={args.clients} d={args.d} r={args.rank} float32, best of {args.repeats}, BLAS threads {threads}",
          flush=True)
    t_avg = best_time(average, args.repeats)
    print(f"plain averaging:             {t_avg * 1000:10.2f} ms", flush=True)
    t_fedsvd = best_time(lambda: fedsvd_reorthogonalize(average(), a), args.repeats)
    print(f"averaging + FedSVD (QR):     {t_fedsvd * 1000:10.2f} ms", flush=True)
    if args.skip_dense:
        dense = "skipped"
    else:
        t_dense = best_time(lambda: fedsvd_reorthogonalize_dense(average(), a), args.dense_repeats)
        print(f"averaging + dense SVD:       {t_dense * 1000:10.2f} ms", flush=True)
        dense = f"{t_dense / t_fedsvd:.1f}"
    print(f"fedsvd_vs_avg={t_fedsvd / t_avg:.2f} dense_vs_fedsvd={dense}")


if __name__ == "__main__":
    main()
