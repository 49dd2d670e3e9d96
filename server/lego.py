"""LoRA-LEGO: merge LoRA adapters at rank-1 granularity by clustering their rank units (card 23).

A LoRA update is ΔW = B A = Σ_j b_j a_jᵀ, with b_j the j-th column of B and a_j the j-th row of A.
LoRA-LEGO calls each rank-1 pair (b_j, a_j) a "minimal semantic unit" (MSU) and uses two facts:
permuting the ranks jointly in B and A leaves ΔW unchanged, and concatenation equals summation,
[B_1 … B_K][A_1; …; A_K] = Σ_k B_k A_k. So the exact weighted mean Σ_k p_k B_k A_k is the sum of the
pooled units (p_k b_kj, a_kj), of rank Σ_k r_k. To get back down to a fixed rank, LEGO embeds every
unit as the vector [b; a], runs k-means with k = rank, and turns each cluster into one merged unit.

Canonicalization. A unit fixes b aᵀ only, not (b, a): b aᵀ = (c b)(a / c)ᵀ = (−b)(−a)ᵀ. Two clients can
send the same update in different gauges, and [b; a] would then land far apart, so every unit is first
balanced (‖b‖ = ‖a‖) and its sign fixed (a's largest-magnitude entry positive). Card 23 is unsure
whether the paper does this; without it the clustering is not a function of the updates ΔW_k alone.
The pooled units are also sorted by a canonical key before clustering, so the result does not depend
on the order of clients or of ranks inside a client (up to floating-point ties between units).

Merged unit of cluster S: the centroid of [b; a] over S, both halves scaled by sqrt(|S|), so that
b_c a_cᵀ = |S| · mean_b mean_aᵀ, which is exactly Σ_{i∈S} b_i a_iᵀ when the members are identical.

Reweighting. The paper's "dual reweighting" has two parts. Only the first, parameter-space norm
matching, is implemented: the merged product is scaled so ‖B A‖_F = ‖Σ_k p_k B_k A_k‖_F (sqrt of the
scale on each factor). The second part reweights on the outputs and needs data on the server, which a
federated server does not have; it is left out.

This is a heuristic. The Frobenius-optimal rank-k reduction of the pooled units is the truncated SVD of
the stacked product (server/rank_merging.py's flexlora_merge); k-means is cheaper to explain per unit
but carries no optimality guarantee. It is server-side post-processing of the clients' DP-trained
outputs and so costs no privacy. It is not linear in the client payloads (canonicalization, k-means and
norm matching are all nonlinear), so it cannot run under secure aggregation, which only reveals sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lego_merge(bs: list[np.ndarray], as_: list[np.ndarray], weights: Sequence[float], rank: int, *,
               iters: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Merge client LoRAs (B_k: d_out × r_k, A_k: r_k × d_in) into one rank-`rank` LoRA (B, A).

    Weights are normalized to p_k = w_k / Σ w. If at most `rank` non-zero units are pooled, no
    clustering happens and B A is the exact weighted mean (zero-padded to `rank`). Otherwise the units
    are clustered by k-means (k-means++ seeded by `seed`, at most `iters` Lloyd steps) and the merged
    product is norm-matched to the exact mean. Components come out ordered by decreasing ‖b_c‖·‖a_c‖,
    so a prefix holds the largest units. Returns factors in bs[0]'s dtype (float64 if that is not a
    floating dtype); all the math is float64.
    """
    p = _normalized_weights(weights, len(bs))
    d_out, d_in = _validate_factors(bs, as_)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    dtype = bs[0].dtype if np.issubdtype(bs[0].dtype, np.floating) else np.dtype(np.float64)
    rank = int(rank)

    # Pool the units (p_k b_kj, a_kj); their outer products sum to the exact weighted mean.
    unit_b = np.concatenate([p_k * b.astype(np.float64) for p_k, b in zip(p, bs)], axis=1).T  # (N, d_out)
    unit_a = np.concatenate([a.astype(np.float64) for a in as_], axis=0)  # (N, d_in)
    target_sq = _product_norm_sq(unit_b.T, unit_a)
    unit_b, unit_a = _canonicalize(unit_b, unit_a)

    out_b = np.zeros((d_out, rank), dtype=np.float64)
    out_a = np.zeros((rank, d_in), dtype=np.float64)
    n_units = unit_b.shape[0]
    if n_units == 0:
        return out_b.astype(dtype), out_a.astype(dtype)
    if n_units <= rank:
        merged_b, merged_a = unit_b.T, unit_a
    else:
        points = np.concatenate([unit_b, unit_a], axis=1)
        labels, centroids = _kmeans(points, rank, iters=iters, seed=seed)
        sizes = np.bincount(labels, minlength=rank).astype(np.float64)
        scaled = centroids * np.sqrt(sizes)[:, None]
        merged_b, merged_a = scaled[:, :d_out].T, scaled[:, d_out:]
        merged_sq = _product_norm_sq(merged_b, merged_a)
        if merged_sq > 0.0:
            scale = np.sqrt(np.sqrt(target_sq / merged_sq))  # ‖BA‖ scales by scale², split on both factors
            merged_b, merged_a = merged_b * scale, merged_a * scale

    magnitudes = np.linalg.norm(merged_b, axis=0) * np.linalg.norm(merged_a, axis=1)
    order = np.argsort(-magnitudes, kind="stable")
    k = merged_b.shape[1]
    out_b[:, :k] = merged_b[:, order]
    out_a[:k] = merged_a[order]
    return out_b.astype(dtype), out_a.astype(dtype)


def _normalized_weights(weights: Sequence[float], n_clients: int) -> np.ndarray:
    w = np.asarray(list(weights), dtype=np.float64)
    if w.size == 0:
        raise ValueError("no weights: nothing to merge")
    if w.ndim != 1 or w.size != n_clients:
        raise ValueError(f"expected one weight per client ({n_clients}), got {w.size}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    total = float(w.sum())
    if total <= 0.0:
        raise ValueError("weights must sum to a positive number")
    return w / total


def _validate_factors(bs: list[np.ndarray], as_: list[np.ndarray]) -> tuple[int, int]:
    if len(bs) == 0:
        raise ValueError("no clients: nothing to merge")
    if len(bs) != len(as_):
        raise ValueError(f"got {len(bs)} B factors but {len(as_)} A factors")
    d_out = d_in = None
    for k, (b, a) in enumerate(zip(bs, as_)):
        b, a = np.asarray(b), np.asarray(a)
        if b.ndim != 2 or a.ndim != 2:
            raise ValueError(f"client {k}: B and A must be 2-D, got shapes {b.shape} and {a.shape}")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"client {k}: B is {b.shape} but A is {a.shape}; B's columns must equal A's rows")
        if d_out is None:
            d_out, d_in = b.shape[0], a.shape[1]
        elif (b.shape[0], a.shape[1]) != (d_out, d_in):
            raise ValueError(f"client {k}: ΔW is {b.shape[0]}×{a.shape[1]}, client 0's is {d_out}×{d_in}")
        if not (np.all(np.isfinite(b)) and np.all(np.isfinite(a))):
            raise ValueError(f"client {k}: factors contain non-finite values")
    return d_out, d_in


def _product_norm_sq(b: np.ndarray, a: np.ndarray) -> float:
    """‖B A‖_F² = tr(Bᵀ B A Aᵀ) = sum((BᵀB) ∘ (AAᵀ)), without forming the d_out × d_in product."""
    return float(max(np.sum((b.T @ b) * (a @ a.T)), 0.0))


def _canonicalize(unit_b: np.ndarray, unit_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balance (‖b‖ = ‖a‖), fix signs (a's largest-magnitude entry > 0), drop zero units, sort canonically.

    Rows are units. The sort (by decreasing ‖b‖‖a‖, ties broken by the entries) removes any dependence
    on client order or rank order from the k-means++ seeding.
    """
    nb = np.linalg.norm(unit_b, axis=1)
    na = np.linalg.norm(unit_a, axis=1)
    keep = (nb > 0.0) & (na > 0.0)
    unit_b, unit_a, nb, na = unit_b[keep], unit_a[keep], nb[keep], na[keep]
    c = np.sqrt(na / nb)
    unit_b = unit_b * c[:, None]
    unit_a = unit_a / c[:, None]
    pivots = unit_a[np.arange(unit_a.shape[0]), np.abs(unit_a).argmax(axis=1)]
    signs = np.where(pivots < 0.0, -1.0, 1.0)
    unit_b, unit_a = unit_b * signs[:, None], unit_a * signs[:, None]
    magnitude = nb * na
    points = np.concatenate([unit_b, unit_a], axis=1)
    order = np.lexsort(np.vstack([points.T[::-1], -magnitude]))  # last key is the primary one
    return unit_b[order], unit_a[order]


def _kmeans(points: np.ndarray, k: int, *, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; returns (labels (N,), centroids (k, D)). Needs N >= k.

    An empty cluster is re-seeded with the point farthest from its current centroid (taken from a
    cluster that keeps at least one member), so every cluster ends non-empty.
    """
    n = points.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    rng = np.random.default_rng(seed)
    sq_norms = np.einsum("ij,ij->i", points, points)

    def sq_dists(centroids: np.ndarray) -> np.ndarray:
        c_norms = np.einsum("ij,ij->i", centroids, centroids)
        return np.maximum(sq_norms[:, None] - 2.0 * points @ centroids.T + c_norms[None, :], 0.0)

    # k-means++: first centre uniform, each next one with probability ∝ squared distance to the nearest.
    centroids = np.empty((k, points.shape[1]))
    centroids[0] = points[rng.integers(n)]
    closest = sq_dists(centroids[:1])[:, 0]
    for i in range(1, k):
        total = closest.sum()
        idx = rng.choice(n, p=closest / total) if total > 0.0 else rng.integers(n)
        centroids[i] = points[idx]
        closest = np.minimum(closest, sq_dists(centroids[i:i + 1])[:, 0])

    labels = np.full(n, -1)
    for _ in range(iters):
        dists = sq_dists(centroids)
        new_labels = dists.argmin(axis=1)
        new_labels = _fill_empty_clusters(new_labels, dists, k)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for i in range(k):
            centroids[i] = points[labels == i].mean(axis=0)
    return labels, centroids


def _fill_empty_clusters(labels: np.ndarray, dists: np.ndarray, k: int) -> np.ndarray:
    labels = labels.copy()
    for i in range(k):
        if np.any(labels == i):
            continue
        counts = np.bincount(labels, minlength=k)
        own = dists[np.arange(labels.size), labels]
        movable = counts[labels] > 1  # never empty another cluster
        own = np.where(movable, own, -np.inf)
        labels[int(own.argmax())] = i
    return labels
