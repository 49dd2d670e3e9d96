"""Merging LoRA updates of different ranks, as pure numpy functions checked against closed forms in tests.

Client k sends ΔW_k = B_k A_k with B_k (d_out x r_k) and A_k (r_k x d_in); its weight w_k (example count)
becomes p_k = w_k / Σ w. Two facts carry everything here (METHODS.md card 23): permuting ranks jointly in
B and A leaves B A unchanged, and concatenation is summation, [p_1 B_1 … p_K B_K] [A_1; …; A_K] = Σ p_k B_k A_k.
The exact mean therefore has rank R = Σ r_k, and the best rank-r reduction of it is a truncated SVD that
is computed from the factors alone, never forming a d_out x d_in matrix (`svd_of_product`).

Math runs in float64 (or on the factors as sent, where noted); results come back in the first client's B
dtype. Server timings against plain averaging and a dense SVD: `python -m simulations.bench_aggregation`.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence

import numpy as np

from server.aggregation import _canonical_signs

RANDOMIZED_ABOVE: int = 512
"""`svd_of_product(method="auto")` switches from the exact QR route to the randomized one above this R:
the exact route costs O((d_in + d_out) R²), the randomized one O((d_in + d_out) R (rank + oversample))."""


SKETCH_MULTIPLE: int = 16
"""The randomized route rounds ℓ = rank + oversample up to a multiple of this: OpenBLAS's float32 GEMM
kernels work in blocks of 8/16 columns, so ℓ = 48 ran faster than ℓ = 42 (d = 4096, R = 1540, 2 cores), and
the extra test vectors only tighten the error (HMT's bound decreases in the oversampling)."""


def normalized(weights: Sequence[float]) -> np.ndarray:
    """p_k = w_k / Σ w; a negative or all-zero weight would silently flip or erase an update, so refuse it."""
    p = np.asarray(weights, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise ValueError("no weights: at least one client must reply")
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError(f"weights must be finite and non-negative (example counts), got {p.tolist()}")
    total = p.sum()
    if not total > 0:
        raise ValueError("weights must sum to a positive number; did every client report 0 examples?")
    return p / total


def pad_rank(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Append zero columns to B and zero rows to A up to `rank`: the product is unchanged (HetLoRA's padding)."""
    r = _check_pair(b, a)
    if r > rank:
        raise ValueError(f"cannot pad a rank-{r} adapter down to rank {rank}; use truncate_rank")
    new_b = np.zeros((b.shape[0], rank), dtype=b.dtype)
    new_a = np.zeros((rank, a.shape[1]), dtype=a.dtype)
    new_b[:, :r] = b
    new_a[:r] = a
    return new_b, new_a


def truncate_rank(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `rank` components (B[:, :rank], A[:rank]) as copies; all of them if `rank` >= r.

    After `svd_of_product` the components are in decreasing singular value order, so this prefix is the
    best rank-`rank` approximation; on arbitrary factors it is just HetLoRA's truncation.
    """
    _check_pair(b, a)
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return b[:, :rank].copy(), a[:rank].copy()


def product_norm(b: np.ndarray, a: np.ndarray) -> float:
    """‖B A‖_F = sqrt(Σ (BᵀB) ⊙ (A Aᵀ)) from two r x r Gram matrices, without the d_out x d_in product."""
    _check_pair(b, a)
    b64, a64 = b.astype(np.float64, copy=False), a.astype(np.float64, copy=False)
    squared = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
    return math.sqrt(max(squared, 0.0))  # rounding can leave a tiny negative when B A is ~0


def stack_factors(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float],
                  _workspace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """([p_1 B_1 … p_K B_K], [A_1; …; A_K]): their product is Σ p_k B_k A_k exactly, of rank R = Σ r_k.

    The weight goes on B only, so every A_k travels as sent. Returned in the first client's B dtype.
    `_workspace=True` writes into this thread's reusable buffers (`_Workspace`): for callers that only read
    the stacks before their next call, like `flexlora_merge`.
    """
    p, ranks = _check_clients(bs, as_, weights)
    dtype = bs[0].dtype
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    total = int(sum(ranks))
    if _workspace:
        b_stack, a_stack = _WORKSPACE.stacks(d_out, d_in, total, dtype)
    else:
        b_stack, a_stack = np.empty((d_out, total), dtype=dtype, order="F"), np.empty((total, d_in), dtype=dtype)
    start = 0  # b_stack is column-major: each client's block is one contiguous write
    for b, r, p_k in zip(bs, ranks, p, strict=True):
        block = b_stack[:, start:start + r]
        block[...] = b  # a transposing copy (B_k is row-major): with the GEMMs, the main cost of FlexLoRA
        block *= dtype.type(p_k)  # weighted while still in cache
        start += r
    return b_stack, np.concatenate(as_, axis=0, out=a_stack)


class _Workspace(threading.local):
    """Per-thread buffers for the stacks, grown to the largest request and then reused.

    The server merges every adapted layer every round, mostly of one shape; at K=100, d=4096 the two
    stacks are 50 MB, and touching fresh pages for them cost ~10 ms per merge (15 interleaved calls:
    66.7 vs 76.9 ms best), about a sixth of FlexLoRA's time. Holds at most the largest layer's stacks.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def stacks(self, d_out: int, d_in: int, total: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        b_flat, a_flat = self.buffers.get(dtype.str, (np.empty(0, dtype), np.empty(0, dtype)))
        if b_flat.size < d_out * total:
            b_flat = np.empty(d_out * total, dtype)
        if a_flat.size < total * d_in:
            a_flat = np.empty(total * d_in, dtype)
        self.buffers[dtype.str] = (b_flat, a_flat)
        # (total x d_out) row-major, transposed: a column-major d_out x total view of the same memory
        return b_flat[:d_out * total].reshape(total, d_out).T, a_flat[:total * d_in].reshape(total, d_in)


_WORKSPACE = _Workspace()


def randomized_error_factor(rank: int, oversample: int, passes: int, min_dim: int) -> float:
    """C in HMT's bound E‖M − M_ℓ‖_2 <= C σ_{rank+1} after `passes` products (see `svd_of_product`).

    Needs oversample >= 2 and passes >= 2.
    """
    p = oversample
    if p < 2:
        raise ValueError("the HMT bound needs oversample >= 2")
    if passes < 2:
        raise ValueError(f"the randomized SVD needs at least 2 passes over M, got {passes}")
    base = 1 + math.sqrt(rank / (p - 1)) + math.e * math.sqrt(rank + p) / p * math.sqrt(max(min_dim - rank, 0))
    return base ** (1.0 / (passes - 1))


def svd_of_product(b: np.ndarray, a: np.ndarray, rank: int, *, method: str = "auto", oversample: int = 10,
                   passes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` approximation of M = B A as (B' = U Σ, A' = Vᵀ), never forming the d_out x d_in M.

    Components come in decreasing singular value order, so any prefix (B'[:, :k], A'[:k]) is the best
    rank-k approximation, with canonical signs (`aggregation._canonical_signs`) so every route agrees.
    A' always has `rank` orthonormal rows, even where M has fewer than `rank` non-zero singular values:
    FedSVD clients train B against a frozen A, and a zero row of A would be a slot that never learns.

    Parameters
    ----------
    b, a : B (d_out x R) and A (R x d_in), float32 or float64.
    rank : output rank, 1 <= rank <= min(d_out, d_in).
    method : "exact", "randomized", or "auto" (default): exact if R <= RANDOMIZED_ABOVE, else randomized.
        "exact": thin QR of B and of Aᵀ, then the SVD of the small R x R core R_b R_aᵀ, since
        B A = Q_b (R_b R_aᵀ) Q_aᵀ. Cost O((d_in + d_out) R²), float64.
        "randomized": Halko–Martinsson–Tropp (SIAM Review 2011) range finder with ℓ = rank + oversample
        (rounded up to a multiple of `SKETCH_MULTIPLE`) Gaussian test vectors, applying M and Mᵀ alternately `passes` times (re-orthonormalized by QR in
        between) and only through the factors (M X = B (A X)), so the cost is `passes` x (d_in + d_out) R ℓ
        multiply-adds in the factors' dtype (float32 as clients send them); the ℓ x ℓ SVD runs in float64.
        passes = 2q + 2 is HMT's algorithm with q power iterations (M ≈ Q Qᵀ M, Q spanning (M Mᵀ)^q M Ω);
        an odd count ends on the other side (M ≈ M W Wᵀ, W spanning (Mᵀ M)^{(passes−1)/2} Ω).
        Either way the basis sees the singular values raised to the power passes − 1, and by HMT
        Cor. 10.10 (its Prop. 8.6 holds for any real power >= 1), with k = rank and p = oversample >= 2,
            E‖M − M_ℓ‖_2 <= C σ_{k+1},
            C = [1 + √(k/(p−1)) + e √(k+p)/p · √(min(d_out, d_in) − k)]^{1/(passes − 1)}
        (`randomized_error_factor`), and truncating M_ℓ to rank k adds at most σ_{k+1} (HMT Thm. 9.3), so E‖M − B'A'‖_2 <= (1 + C) σ_{k+1}; the optimum is σ_{k+1}. The result
        is exact (up to rounding) when R <= ℓ: the sketch then spans the whole range of M.
        Against the optimal Frobenius error, on 60 clients of ranks 4–32 at d = 512 that share a decaying
        spectrum (flat random ones in brackets): 2 passes 34% (9.6%) above it, the default 3 passes 0.2%
        (4.8%), 4 passes < 0.01% (2.6%), 6 passes < 0.01% (1.0%) (`test_randomized_frobenius_error_is_close_
        to_the_optimum`). Each pass costs the same; 3 keep FlexLoRA within 3x plain averaging at K = 100,
        d = 4096 (`python -m simulations.bench_aggregation --passes N`, figures in the README).
    oversample, passes, seed : the randomized route's ℓ − rank, number of products with M or Mᵀ (>= 2),
        and seed of its Gaussian test matrix (also seeds the completion rows of A' when M has rank
        < `rank`).
    """
    r = _check_pair(b, a)
    d_out, d_in = b.shape[0], a.shape[1]
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be in [1, min(d_out, d_in) = {min(d_out, d_in)}], got {rank}")
    if method == "auto":
        method = "exact" if r <= RANDOMIZED_ABOVE else "randomized"
    rng = np.random.default_rng(seed)
    if r == 0:
        new_b, new_a = np.zeros((d_out, 0)), np.zeros((0, d_in))
    elif method == "exact":
        new_b, new_a = _exact_svd(b, a, rank)
    elif method == "randomized":
        new_b, new_a = _randomized_svd(b, a, rank, oversample, passes, seed)
    else:
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    if new_a.shape[0] < rank:  # M has fewer than `rank` components: pad with dead B columns, live A rows
        extra = rank - new_a.shape[0]
        new_b = np.hstack([new_b, np.zeros((d_out, extra))])
        new_a = np.vstack([new_a, _orthonormal_completion(new_a, extra, rng)])
    new_b, new_a = _canonical_signs(new_b, new_a)
    return new_b.astype(b.dtype), new_a.astype(b.dtype)


def flexlora_merge(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float], rank: int,
                   **svd_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """FlexLoRA: the best rank-`rank` approximation of the exact weighted mean Σ p_k B_k A_k."""
    return svd_of_product(*stack_factors(bs, as_, weights, _workspace=True), rank, **svd_kwargs)


def hetlora_merge(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float],
                  rank: int) -> tuple[np.ndarray, np.ndarray]:
    """HetLoRA (Cho et al. 2024): zero-pad every client to `rank`, then average B's and A's factor by factor.

    The weights are "sparsity-weighted", q_k ∝ p_k ‖B_k A_k‖_F, so a client whose update is larger counts
    more; if every update is zero they fall back to p_k. Averaging factors is not averaging products
    (mean(B) mean(A) != mean(B A)): that approximation is HetLoRA's, not ours.
    """
    p, ranks = _check_clients(bs, as_, weights)
    if max(ranks) > rank:
        raise ValueError(f"client ranks {sorted(set(ranks))} exceed the global rank {rank}; HetLoRA pads, "
                         "it does not truncate")
    norms = np.array([product_norm(b, a) for b, a in zip(bs, as_, strict=True)])
    q = p * norms
    q = q / q.sum() if q.sum() > 0 else p
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    new_b, new_a = np.zeros((d_out, rank)), np.zeros((rank, d_in))
    for b, a, q_k, r in zip(bs, as_, q, ranks, strict=True):
        new_b[:, :r] += q_k * b
        new_a[:r] += q_k * a
    return new_b.astype(bs[0].dtype), new_a.astype(bs[0].dtype)


def hetero_fedsvd_merge(bs: Sequence[np.ndarray], b_global: np.ndarray, a_global: np.ndarray,
                        weights: Sequence[float], rank: int, **svd_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """FedSVD with rank-heterogeneous clients; returns (B', A') with A' orthonormal rows.

    Client k received the prefix (B_g[:, :r_k], A_g[:r_k]), trained B only against the frozen A, and sends
    B_k (d_out x r_k). It left the slots it did not hold unchanged, so its full view is [B_k, B_g[:, r_k:]].
    The merge B̄ = Σ p_k [B_k, B_g[:, r_k:]] is linear in the payloads (secure-aggregation compatible); the
    re-orthogonalization `svd_of_product(B̄, A_g, rank)` then gives, when rank >= r_g,
    B'A' = Σ p_k (B_k A_g[:r_k] + B_g[:, r_k:] A_g[r_k:]). With every r_k = r_g it is plain FedSVD.
    """
    _check_pair(b_global, a_global)
    bs = list(bs)
    p = normalized(weights)
    if len(bs) != len(p):
        raise ValueError(f"{len(bs)} payloads but {len(p)} weights")
    d_out, r_g = b_global.shape
    for k, b in enumerate(bs):
        if b.ndim != 2 or b.shape[0] != d_out or b.shape[1] > r_g:
            raise ValueError(f"client {k} sent B of shape {b.shape}; expected ({d_out}, r_k) with r_k <= {r_g}, "
                             "a prefix of the global B")
    # Column j of B_g survives with the total weight of the clients that did not hold slot j.
    b_mean = b_global.astype(np.float64) * _untouched_share(p, [b.shape[1] for b in bs], r_g)
    for b, p_k in zip(bs, p, strict=True):
        b_mean[:, :b.shape[1]] += p_k * b
    new_b, new_a = svd_of_product(b_mean, a_global, rank, **svd_kwargs)
    return new_b.astype(bs[0].dtype), new_a.astype(bs[0].dtype)


def flora_stack(b_global: np.ndarray, a_global: np.ndarray, bs: Sequence[np.ndarray], as_: Sequence[np.ndarray],
                weights: Sequence[float], max_rank: int = 0, **svd_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA stacking ([B_g, p_1 B_1, …], [A_g; A_1; …]): new product = old product + Σ p_k B_k A_k, exactly.

    The global factors may have 0 columns/rows (first round). The price of exactness is the download: the
    global rank grows by Σ r_k every round, so clients receive (d_in + d_out)(r_g + Σ r_k) numbers per layer
    and the cost grows linearly with the rounds. With `max_rank` > 0 a stack above it is truncated by
    `svd_of_product` to rank min(max_rank, d_out, d_in), the best approximation of that rank (lossless
    whenever the product's rank is at most that).
    """
    _check_pair(b_global, a_global)
    b_new, a_new = stack_factors(bs, as_, weights)
    if b_global.shape[0] != b_new.shape[0] or a_global.shape[1] != a_new.shape[1]:
        raise ValueError(f"global adapter {b_global.shape} x {a_global.shape} does not match the clients' "
                         f"layer ({b_new.shape[0]} x {a_new.shape[1]})")
    dtype = bs[0].dtype
    b_stack = np.hstack([b_global.astype(dtype, copy=False), b_new])
    a_stack = np.vstack([a_global.astype(dtype, copy=False), a_new])
    target = min(max_rank, b_stack.shape[0], a_stack.shape[1])
    if max_rank > 0 and b_stack.shape[1] > target:
        return svd_of_product(b_stack, a_stack, target, **svd_kwargs)
    return b_stack, a_stack


def _exact_svd(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """B A = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD U Σ Vᵀ of the small core gives B A = (Q_b U) Σ (Q_a V)ᵀ.

    Each thin QR is CholeskyQR2 where it is trustworthy (random-like stacks: 5–10x faster than LAPACK's
    Householder QR on d x R, which runs at a few GFLOP/s on these shapes) and Householder otherwise
    (nearly dependent columns, e.g. clients whose A's all start from the same global A).
    """
    apply_qb, r_b = _thin_qr(b.astype(np.float64))
    apply_qa, r_a = _thin_qr(a.astype(np.float64).T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    keep = min(rank, s.size)  # vt's rows are orthonormal even for zero singular values, so A' stays orthonormal
    return apply_qb(u[:, :keep]) * s[:keep], apply_qa(vt[:keep].T).T


def _thin_qr(x: np.ndarray):
    """(x ↦ Q x, R) of a thin QR of x (m x n, m >= n, float64): CholeskyQR2, else Householder."""
    fast = _cholesky_qr2(x)
    if fast is not None:
        q, r = fast
        return q.__matmul__, r
    v, t_inv, r = _householder_qr(x)
    return (lambda y: _times_q(v, t_inv, y)), r


def _cholesky_qr2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Q, R with x = Q R by CholeskyQR2 (Fukaya et al. 2014): R_i from the Cholesky factor of the Gram
    matrix, twice; three small GEMMs per pass. Orthonormal to rounding when κ(x) < ~1e8; None when the
    Cholesky fails or Q is not orthonormal to 1e-10, i.e. where only Householder can be trusted."""
    q, r = x, np.eye(x.shape[1])
    with np.errstate(all="ignore"):
        try:
            for _ in range(2):
                lower = np.linalg.cholesky(q.T @ q)
                q = q @ np.linalg.inv(lower).T
                r = lower.T @ r
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(q)) or np.abs(q.T @ q - np.eye(x.shape[1])).max() >= 1e-10:
            return None
    return q, r


def _randomized_svd(b: np.ndarray, a: np.ndarray, rank: int, oversample: int, passes: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HMT Algorithms 4.4 + 5.1 on M = B A with `passes` products, applied through the factors only."""
    if passes < 2:
        raise ValueError(f"the randomized SVD needs at least 2 passes over M, got {passes}")
    dtype = np.result_type(b.dtype, a.dtype, np.float32)
    b, a = b.astype(dtype, copy=False), a.astype(dtype, copy=False)
    sketch = min(-(-(rank + oversample) // SKETCH_MULTIPLE) * SKETCH_MULTIPLE, b.shape[0], a.shape[1])
    basis = _gaussian_test_matrix(a.shape[1], sketch, np.dtype(dtype).name, seed)  # d_in side: first is M Ω
    for step in range(passes):
        if step % 2 == 0:
            image = b @ (a @ basis)  # M X, d_out x ℓ
        else:
            image = ((basis.T @ b) @ a).T  # Mᵀ X, as (Xᵀ M)ᵀ: the faster GEMM layout for BLAS here
        if step < passes - 1:
            basis = _orthonormal_basis(image)
    # The last image is Y = M X (odd passes) or Y = Mᵀ X (even), X orthonormal: M ≈ Y Xᵀ or X Yᵀ.
    image = image.astype(np.float64)
    q_image = _orthonormal_basis(image)
    u, s, vt = np.linalg.svd(q_image.T @ image)  # Y = Q_Y (Q_Yᵀ Y) = Q_Y U Σ Vᵀ, so Y Xᵀ = (Q_Y U) Σ (X V)ᵀ
    image_side = q_image @ u[:, :rank]
    basis_side = basis.astype(np.float64) @ vt[:rank].T
    if passes % 2 == 1:
        return image_side * s[:rank], basis_side.T
    return basis_side * s[:rank], image_side.T


@functools.lru_cache(maxsize=8)
def _gaussian_test_matrix(rows: int, columns: int, dtype: str, seed: int) -> np.ndarray:
    """HMT's Gaussian Ω, read-only and cached: it depends only on its shape and seed, and drawing it costs
    as much as a QR of the sketch; every layer of the same shape in every round reuses it."""
    omega = np.random.default_rng(seed).standard_normal((rows, columns), dtype=np.dtype(dtype))
    omega.flags.writeable = False
    return omega


def _householder_qr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Householder QR of x (m x n) as (V, T⁻¹, R) with Q = I − V T Vᵀ, without LAPACK's slow explicit Q.

    numpy's mode="raw" gives the reflectors H_i = I − τ_i v_i v_iᵀ; their product is I − V T Vᵀ with
    T⁻¹ = diag(1/τ) + strict_upper(VᵀV) (the UT transform, Joffrain et al. 2006). Applying Q this way is
    one BLAS-3 product, where `np.linalg.qr`'s orgqr builds Q column by column (several times slower
    on the tall, thin factors here).
    """
    h, tau = np.linalg.qr(x, mode="raw")
    h = h.T  # LAPACK's layout: R on and above the diagonal, the reflectors below it
    k = tau.size
    diagonal = np.arange(k)
    v = np.tril(h[:, :k], -1)
    v[diagonal, diagonal] = 1.0
    dead = tau == 0  # LAPACK's H_i = I (a zero column); a zero reflector with τ = 1 is the same identity
    v[:, dead] = 0.0
    tau = np.where(dead, 1.0, tau)
    t_inv = np.triu(v.T @ v, 1)
    t_inv[diagonal, diagonal] = 1.0 / tau
    return v, t_inv, np.triu(h[:k])


def _times_q(v: np.ndarray, t_inv: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Q[:, :k] x for the thin Q of `_householder_qr`: [x; 0] − V T (V[:k]ᵀ x)."""
    k = t_inv.shape[0]
    out = -(v @ np.linalg.solve(t_inv, v[:k].T @ x))
    out[:k] += x
    return out


def _orthonormal_basis(y: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning y (m x n, m >= n), in y's dtype, even where y is rank deficient.

    CholeskyQR2 in float64 (Fukaya et al. 2014: Q = Y L⁻ᵀ with L Lᵀ = YᵀY, done twice) is three small
    GEMMs, 2–3x faster than Householder on these tall thin sketches, and orthonormal to rounding when
    κ(y) < ~1e8. A rank-deficient or worse-conditioned y fails the Cholesky or the final check, and then
    goes the Householder way, which is always orthonormal.
    """
    fast = _cholesky_qr2(y.astype(np.float64))
    if fast is not None:
        return fast[0].astype(y.dtype)
    v, t_inv, _ = _householder_qr(y.astype(np.float64))
    return _times_q(v, t_inv, np.eye(t_inv.shape[0])).astype(y.dtype)


def _orthonormal_completion(rows: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """`extra` seeded random unit rows orthogonal to each other and to the orthonormal `rows`."""
    existing = rows.shape[0]
    candidates = rng.standard_normal((rows.shape[1], extra))
    q, _ = np.linalg.qr(np.hstack([rows.T, candidates]))
    return q[:, existing:existing + extra].T


def _untouched_share(p: np.ndarray, ranks: Sequence[int], r_g: int) -> np.ndarray:
    """Σ_{k : r_k <= j} p_k for every slot j < r_g: the weight with which slot j of B_g is kept."""
    held = np.bincount(np.asarray(ranks, dtype=np.int64), weights=p, minlength=r_g + 1)
    return np.cumsum(held)[:r_g]


def _check_pair(b: np.ndarray, a: np.ndarray) -> int:
    if b.ndim != 2 or a.ndim != 2:
        raise ValueError(f"B and A must be matrices, got shapes {b.shape} and {a.shape}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"B {b.shape} and A {a.shape} disagree on the rank (B's columns must equal A's rows)")
    return b.shape[1]


def _check_clients(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray],
                   weights: Sequence[float]) -> tuple[np.ndarray, list[int]]:
    """p_k and r_k after checking that every client's (B_k, A_k) adapts the same d_out x d_in layer."""
    p = normalized(weights)
    if not len(bs) == len(as_) == len(p):
        raise ValueError(f"{len(bs)} B's, {len(as_)} A's and {len(p)} weights: one of each per client")
    ranks = [_check_pair(b, a) for b, a in zip(bs, as_, strict=True)]
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    for k, (b, a) in enumerate(zip(bs, as_, strict=True)):
        if b.shape[0] != d_out or a.shape[1] != d_in:
            raise ValueError(f"client {k} adapts a {b.shape[0]} x {a.shape[1]} layer, client 0 a {d_out} x {d_in} one")
    return p, ranks
