"""Rank-heterogeneous LoRA merging against closed forms and against SVDs of the dense d_out x d_in product."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import rank_merging
from server.aggregation import _canonical_signs, fedsvd_reorthogonalize, weighted_mean
from server.rank_merging import (
    RANDOMIZED_ABOVE,
    flexlora_merge,
    flora_stack,
    hetero_fedsvd_merge,
    hetlora_merge,
    normalized,
    pad_rank,
    product_norm,
    randomized_error_factor,
    stack_factors,
    svd_of_product,
    truncate_rank,
)


def clients(ranks, d_out=40, d_in=30, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    bs = [rng.normal(size=(d_out, r)).astype(dtype) for r in ranks]
    as_ = [rng.normal(size=(r, d_in)).astype(dtype) for r in ranks]
    weights = rng.integers(1, 100, size=len(ranks)).astype(float).tolist()
    return bs, as_, weights


def mean_product(bs, as_, weights):
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    return sum(p_k * (b.astype(np.float64) @ a.astype(np.float64)) for p_k, b, a in zip(p, bs, as_, strict=True))


def dense_best(m, rank):
    """Reference: truncated SVD of the dense matrix, in the same canonical signs."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return _canonical_signs(u[:, :rank] * s[:rank], vt[:rank])


def assert_orthonormal_rows(a, atol=1e-10):
    np.testing.assert_allclose(a.astype(np.float64) @ a.astype(np.float64).T, np.eye(a.shape[0]), atol=atol)


def test_normalized_weights_and_their_errors():
    np.testing.assert_allclose(normalized([1, 3]), [0.25, 0.75])
    np.testing.assert_allclose(normalized([0, 2]), [0.0, 1.0])
    for bad, match in (([], "no weights"), ([1, -1], "non-negative"), ([0, 0], "positive"),
                       ([1, float("nan")], "finite")):
        with pytest.raises(ValueError, match=match):
            normalized(bad)


def test_stacking_is_the_exact_weighted_mean_and_rank_order_does_not_matter():
    bs, as_, weights = clients([4, 8, 16])
    b_stack, a_stack = stack_factors(bs, as_, weights)
    assert b_stack.shape == (40, 28) and a_stack.shape == (28, 30)
    np.testing.assert_allclose(b_stack @ a_stack, mean_product(bs, as_, weights), rtol=0, atol=1e-10)
    perm = np.random.default_rng(1).permutation(28)  # joint permutation of rank units
    np.testing.assert_allclose(b_stack[:, perm] @ a_stack[perm], b_stack @ a_stack, rtol=0, atol=1e-10)
    order = [2, 0, 1]  # and of clients
    b_again, a_again = stack_factors([bs[i] for i in order], [as_[i] for i in order], [weights[i] for i in order])
    np.testing.assert_allclose(b_again @ a_again, b_stack @ a_stack, rtol=0, atol=1e-10)


def test_pad_and_truncate_round_trip():
    (b,), (a,), _ = clients([3])
    padded_b, padded_a = pad_rank(b, a, 7)
    assert padded_b.shape == (40, 7) and padded_a.shape == (7, 30) and padded_b.dtype == b.dtype
    assert not padded_b[:, 3:].any() and not padded_a[3:].any()
    np.testing.assert_array_equal(padded_b @ padded_a, b @ a)
    back_b, back_a = truncate_rank(padded_b, padded_a, 3)
    np.testing.assert_array_equal(back_b, b)
    np.testing.assert_array_equal(back_a, a)
    back_b[0, 0] += 1.0  # a copy, not a view
    assert padded_b[0, 0] == b[0, 0]
    with pytest.raises(ValueError, match="truncate"):
        pad_rank(b, a, 2)
    with pytest.raises(ValueError, match="rank"):
        pad_rank(b, a[:2], 5)


@settings(max_examples=30, deadline=None)
@given(d_out=st.integers(1, 30), d_in=st.integers(1, 30), rank=st.integers(0, 10), seed=st.integers(0, 10_000))
def test_product_norm_is_the_frobenius_norm_of_the_product(d_out, d_in, rank, seed):
    rng = np.random.default_rng(seed)
    b, a = rng.normal(size=(d_out, rank)), rng.normal(size=(rank, d_in))
    assert math.isclose(product_norm(b, a), np.linalg.norm(b @ a), rel_tol=1e-9, abs_tol=1e-12)


def test_product_norm_of_a_cancelling_product_is_zero():
    b = np.array([[1.0, 1.0]])
    a = np.array([[1.0, 2.0], [-1.0, -2.0]])  # B A = 0: the Gram formula may round to a tiny negative
    assert product_norm(b, a) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("ranks,rank", [((4, 8, 16), 5), ((4, 8, 16), 12), ((16, 16), 20), ((2, 3), 5)])
def test_exact_route_equals_the_dense_svd(ranks, rank):
    bs, as_, weights = clients(ranks)
    b_stack, a_stack = stack_factors(bs, as_, weights)
    new_b, new_a = svd_of_product(b_stack, a_stack, rank, method="exact")
    dense_b, dense_a = dense_best(b_stack @ a_stack, rank)
    scale = np.abs(dense_b).max()
    np.testing.assert_allclose(new_b, dense_b, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(new_a, dense_a, rtol=0, atol=1e-10)
    assert_orthonormal_rows(new_a)
    singular_values = np.linalg.svd(b_stack @ a_stack, compute_uv=False)[:rank]
    np.testing.assert_allclose(new_b.T @ new_b, np.diag(singular_values**2), rtol=0, atol=1e-9 * scale**2)


def test_exact_route_in_float32_matches_the_float64_dense_svd():
    bs, as_, weights = clients((4, 8, 16), d_out=96, d_in=80, dtype=np.float32)
    b_stack, a_stack = stack_factors(bs, as_, weights)
    assert b_stack.dtype == np.float32
    new_b, new_a = svd_of_product(b_stack, a_stack, 10, method="exact")
    assert new_b.dtype == new_a.dtype == np.float32
    dense_b, dense_a = dense_best(b_stack.astype(np.float64) @ a_stack.astype(np.float64), 10)
    np.testing.assert_allclose(new_b, dense_b, rtol=0, atol=1e-5 * np.abs(dense_b).max())
    np.testing.assert_allclose(new_a, dense_a, rtol=0, atol=1e-5)
    assert_orthonormal_rows(new_a, atol=1e-6)


@pytest.mark.parametrize("spread", [1.0, 1e-4, 1e-7, 1e-10, 0.0])
def test_exact_route_stays_exact_when_clients_start_from_one_global_a(spread, monkeypatch):
    """FlexLoRA's real stacks: every client's A starts from the same global A, so the stacked A's rows are
    nearly dependent (spread -> 0). CholeskyQR2 serves well-conditioned stacks and Householder the rest;
    either way the result is the dense truncation, and the test checks that both routes were taken."""
    rng = np.random.default_rng(11)
    a_global = np.linalg.qr(rng.normal(size=(60, 16)))[0].T
    ranks = (4, 8, 16, 16)
    bs = [rng.normal(size=(50, r)) for r in ranks]
    as_ = [a_global[:r] + spread * rng.normal(size=(r, 60)) for r in ranks]
    weights = [30.0, 10.0, 25.0, 35.0]
    routes = []
    original = rank_merging._cholesky_qr2
    monkeypatch.setattr(rank_merging, "_cholesky_qr2", lambda x: routes.append(original(x) is not None)
                        or original(x))
    new_b, new_a = flexlora_merge(bs, as_, weights, 8, method="exact")
    dense_b, dense_a = dense_best(mean_product(bs, as_, weights), 8)
    np.testing.assert_allclose(new_b @ new_a, dense_b @ dense_a, rtol=0, atol=1e-9 * np.abs(dense_b).max())
    assert_orthonormal_rows(new_a)
    assert routes[0] is True  # the stacked B's are random: CholeskyQR2
    if spread >= 1e-4:
        assert routes[1] is True
    if spread <= 1e-10:  # (numerically) dependent A rows: the Cholesky or its check fails -> Householder
        assert routes[1] is False


def test_every_prefix_is_the_best_approximation_of_its_rank():
    bs, as_, weights = clients((4, 8, 16))
    b_stack, a_stack = stack_factors(bs, as_, weights)
    new_b, new_a = svd_of_product(b_stack, a_stack, 12)
    m = b_stack @ a_stack
    for k in (1, 3, 7, 12):
        dense_b, dense_a = dense_best(m, k)
        np.testing.assert_allclose(new_b[:, :k] @ new_a[:k], dense_b @ dense_a, rtol=0, atol=1e-10)
        prefix_b, prefix_a = truncate_rank(new_b, new_a, k)
        np.testing.assert_allclose(prefix_b, dense_b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_padding_keeps_the_product_and_a_live_orthonormal_a(method):
    """R = 3 < rank = 8: five extra components with zero B columns but orthonormal A rows."""
    bs, as_, weights = clients((1, 2))
    b_stack, a_stack = stack_factors(bs, as_, weights)
    new_b, new_a = svd_of_product(b_stack, a_stack, 8, method=method)
    assert new_b.shape == (40, 8) and new_a.shape == (8, 30)
    np.testing.assert_allclose(new_b @ new_a, b_stack @ a_stack, rtol=0, atol=1e-10)
    assert_orthonormal_rows(new_a)
    np.testing.assert_allclose(new_b[:, 3:], 0.0, atol=1e-10)
    again_b, again_a = svd_of_product(b_stack, a_stack, 8, method=method)  # seeded: deterministic
    np.testing.assert_array_equal(again_a, new_a)


def test_zero_and_rank_deficient_products_still_give_orthonormal_a():
    rng = np.random.default_rng(5)
    b = rng.normal(size=(20, 6))
    b[:, 3:] = b[:, :3]  # rank 3 product from R = 6 >= rank = 5: zero singular values inside the SVD
    a = rng.normal(size=(6, 15))
    a[3:] = 0.0
    for bb, aa in ((b, a), (np.zeros((20, 4)), np.zeros((4, 15))), (np.zeros((20, 0)), np.zeros((0, 15)))):
        for method in ("exact", "randomized"):
            new_b, new_a = svd_of_product(bb, aa, 5, method=method)
            assert new_a.shape == (5, 15)
            np.testing.assert_allclose(new_b @ new_a, bb @ aa, rtol=0, atol=1e-10)
            assert_orthonormal_rows(new_a)


def test_householder_helper_agrees_with_numpy_qr():
    rng = np.random.default_rng(2)
    for shape in ((30, 7), (7, 30), (6, 6)):
        x = rng.normal(size=shape)
        x[:, 1] = 0.0  # a zero column: LAPACK's reflector is the identity (tau = 0)
        v, t_inv, r = rank_merging._householder_qr(x)
        q = rank_merging._times_q(v, t_inv, np.eye(t_inv.shape[0]))
        q_ref, r_ref = np.linalg.qr(x)
        np.testing.assert_allclose(q, q_ref, atol=1e-12)
        np.testing.assert_allclose(r, r_ref, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 30), d_in=st.integers(2, 30), r=st.integers(0, 12), rank=st.integers(1, 12),
       seed=st.integers(0, 10_000), method=st.sampled_from(["exact", "randomized"]))
def test_svd_of_product_properties_on_random_shapes(d_out, d_in, r, rank, seed, method):
    rank = min(rank, d_out, d_in)
    rng = np.random.default_rng(seed)
    b, a = rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))
    new_b, new_a = svd_of_product(b, a, rank, method=method, oversample=max(2, r))  # sketch >= R: exact
    assert new_b.shape == (d_out, rank) and new_a.shape == (rank, d_in)
    assert_orthonormal_rows(new_a, atol=1e-9)
    dense_b, dense_a = dense_best(b @ a, rank)
    np.testing.assert_allclose(new_b @ new_a, dense_b @ dense_a, rtol=0, atol=1e-8 * max(1.0, np.abs(b @ a).max()))


def test_randomized_route_is_exact_when_the_sketch_covers_the_stack():
    bs, as_, weights = clients((4, 8, 6), d_out=60, d_in=50)  # R = 18 <= rank + oversample = 8 + 10
    b_stack, a_stack = stack_factors(bs, as_, weights)
    exact_b, exact_a = svd_of_product(b_stack, a_stack, 8, method="exact")
    fast_b, fast_a = svd_of_product(b_stack, a_stack, 8, method="randomized", seed=3)
    scale = np.abs(exact_b @ exact_a).max()
    np.testing.assert_allclose(fast_b @ fast_a, exact_b @ exact_a, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(fast_a, exact_a, rtol=0, atol=1e-6)
    assert_orthonormal_rows(fast_a)


@functools.cache
def decaying_clients(n_clients=27, rank_each=20, d=560, decay=0.7, seed=0):
    """Clients whose weighted mean has singular values decay**i, i = 0..R-1, in shuffled, rescaled units.

    Cached: building it (two 560 x 540 QRs) costs more than the merge under test; callers must not mutate it.
    """
    rng = np.random.default_rng(seed)
    total = n_clients * rank_each
    u = np.linalg.qr(rng.normal(size=(d, total)))[0]
    v = np.linalg.qr(rng.normal(size=(d, total)))[0]
    sigma = decay ** np.arange(total)
    scale, order = rng.uniform(0.5, 2.0, size=total), rng.permutation(total)  # units in no particular order
    b_stack, a_stack = (u * (sigma * scale))[:, order], (v.T / scale[:, None])[order]
    weights = rng.integers(1, 100, size=n_clients).astype(float)
    p = weights / weights.sum()
    blocks = np.split(np.arange(total), n_clients)
    bs = [b_stack[:, idx] / p_k for idx, p_k in zip(blocks, p, strict=True)]
    as_ = [a_stack[idx] for idx in blocks]
    return bs, as_, weights.tolist(), sigma


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_randomized_route_meets_the_hmt_bound_on_a_decaying_spectrum(dtype, monkeypatch):
    bs, as_, weights, sigma = decaying_clients()
    bs, as_ = [b.astype(dtype) for b in bs], [a.astype(dtype) for a in as_]
    m = mean_product(bs, as_, weights)
    calls = []
    monkeypatch.setattr(rank_merging, "_randomized_svd",
                        lambda *args: calls.append(args) or _randomized_svd(*args))
    rank, oversample, passes = 16, 10, 3  # svd_of_product's defaults
    new_b, new_a = flexlora_merge(bs, as_, weights, rank)  # R = 540 > RANDOMIZED_ABOVE: "auto" goes randomized
    assert len(calls) == 1 and sum(b.shape[1] for b in bs) > RANDOMIZED_ABOVE
    error = np.linalg.norm(m - new_b.astype(np.float64) @ new_a.astype(np.float64), 2)
    optimal = sigma[rank]  # σ_{rank+1}
    bound = 1 + randomized_error_factor(rank, oversample, passes, min(m.shape))
    assert error <= bound * optimal
    assert error <= 1.5 * optimal
    assert_orthonormal_rows(new_a, atol=1e-5 if dtype == np.float32 else 1e-10)


_randomized_svd = rank_merging._randomized_svd


@pytest.mark.parametrize("passes", [2, 3, 4, 5])
def test_randomized_route_meets_the_hmt_bound_on_a_flat_spectrum(passes):
    """Odd counts end on the row side (M ≈ M W Wᵀ), even ones on the column side; both obey the bound."""
    bs, as_, weights = clients([20] * 30, d_out=300, d_in=260, seed=4)
    m = mean_product(bs, as_, weights)
    new_b, new_a = flexlora_merge(bs, as_, weights, 16, method="randomized", passes=passes)
    singular_values = np.linalg.svd(m, compute_uv=False)
    error = np.linalg.norm(m - new_b @ new_a, 2)
    assert error <= (1 + randomized_error_factor(16, 10, passes, 260)) * singular_values[16]
    assert error >= singular_values[16] * (1 - 1e-9)  # Eckart–Young: nothing beats the truncated SVD
    assert_orthonormal_rows(new_a)
    if passes > 2:  # each pass sharpens a flat spectrum
        fewer_b, fewer_a = flexlora_merge(bs, as_, weights, 16, method="randomized", passes=passes - 1)
        assert error < np.linalg.norm(m - fewer_b @ fewer_a, 2)


def shared_subspace_clients(d=512, n_clients=60, seed=1):
    """Federated-looking updates: every client's B_k A_k mixes one decaying 48-dim signal, plus noise."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(d, 48)))[0] * np.exp(-np.arange(48) / 8)
    v = np.linalg.qr(rng.normal(size=(d, 48)))[0]
    bs, as_ = [], []
    for r in rng.choice((4, 8, 16, 32), size=n_clients):
        mix = rng.normal(size=(48, r))
        bs.append((u @ mix + 0.3 * rng.normal(size=(d, r)) / math.sqrt(d)).astype(np.float32))
        as_.append((mix.T @ v.T / math.sqrt(48) + 0.3 * rng.normal(size=(r, d)) / math.sqrt(d)).astype(np.float32))
    return bs, as_, rng.integers(100, 1000, size=n_clients).astype(float).tolist()


@pytest.mark.parametrize(("scenario", "passes", "within"), [
    ("shared", 3, 1.01), ("shared", 4, 1.001), ("flat", 3, 1.06), ("flat", 4, 1.04)])
def test_randomized_frobenius_error_is_close_to_the_optimum(scenario, passes, within):
    """What `svd_of_product`'s docstring promises for the default (3 passes) and for 4 passes, at K = 60."""
    if scenario == "shared":
        bs, as_, weights = shared_subspace_clients()
    else:
        rng = np.random.default_rng(1)
        ranks = rng.choice((4, 8, 16, 32), size=60)
        bs = [(rng.normal(size=(512, r)) / math.sqrt(r)).astype(np.float32) for r in ranks]
        as_ = [(rng.normal(size=(r, 512)) / math.sqrt(512)).astype(np.float32) for r in ranks]
        weights = rng.integers(100, 1000, size=60).astype(float).tolist()
    m = mean_product(bs, as_, weights)
    singular_values = np.linalg.svd(m, compute_uv=False)
    optimal = math.sqrt(np.sum(singular_values[32:] ** 2))
    new_b, new_a = flexlora_merge(bs, as_, weights, 32, passes=passes)  # R > RANDOMIZED_ABOVE: randomized
    assert sum(b.shape[1] for b in bs) > RANDOMIZED_ABOVE
    error = np.linalg.norm(m - new_b.astype(np.float64) @ new_a.astype(np.float64))
    assert optimal * (1 - 1e-6) <= error <= within * optimal


def test_orthonormal_basis_falls_back_to_householder_where_cholesky_cannot_be_trusted():
    rng = np.random.default_rng(5)
    well = rng.normal(size=(200, 12))
    deficient = well.copy()
    deficient[:, 6:] = deficient[:, :6]  # rank 6: YᵀY is singular
    u = np.linalg.qr(rng.normal(size=(200, 12)))[0]
    ill = (u * np.logspace(0, -12, 12)) @ np.linalg.qr(rng.normal(size=(12, 12)))[0]  # κ = 1e12 > 1e8
    for y in (well, deficient, ill, well.astype(np.float32)):
        q = rank_merging._orthonormal_basis(y)
        assert q.dtype == y.dtype and q.shape == y.shape
        np.testing.assert_allclose(q.astype(np.float64).T @ q, np.eye(12), atol=1e-5 if y.dtype == np.float32 else 1e-12)
        np.testing.assert_allclose(q @ (q.T @ y), y, atol=1e-5 * np.abs(y).max())  # q spans y


def test_the_gaussian_test_matrix_is_cached_read_only_and_seeded():
    first = rank_merging._gaussian_test_matrix(50, 7, "float32", 0)
    assert first is rank_merging._gaussian_test_matrix(50, 7, "float32", 0)
    assert not first.flags.writeable and first.dtype == np.float32
    assert not np.array_equal(first, rank_merging._gaussian_test_matrix(50, 7, "float32", 1))
    with pytest.raises(ValueError, match="at least 2 passes"):
        svd_of_product(np.ones((600, 600)), np.ones((600, 600)), 4, method="randomized", passes=1)


def test_flexlora_at_full_rank_is_the_exact_mean_and_below_it_the_dense_truncation():
    bs, as_, weights = clients((4, 8, 16), d_out=50, d_in=40)
    m = mean_product(bs, as_, weights)
    full_b, full_a = flexlora_merge(bs, as_, weights, 28)
    np.testing.assert_allclose(full_b @ full_a, m, rtol=0, atol=1e-10)
    low_b, low_a = flexlora_merge(bs, as_, weights, 6)
    dense_b, dense_a = dense_best(m, 6)
    np.testing.assert_allclose(low_b, dense_b, rtol=0, atol=1e-10 * np.abs(dense_b).max())
    np.testing.assert_allclose(low_a, dense_a, rtol=0, atol=1e-10)
    b32, a32, _ = clients((4, 8, 16), d_out=50, d_in=40, dtype=np.float32)
    assert all(x.dtype == np.float32 for x in flexlora_merge(b32, a32, weights, 6))


def test_hetlora_is_the_norm_weighted_mean_of_padded_factors():
    b1, a1 = np.array([[1.0], [0.0]]), np.array([[2.0, 0.0]])  # B1 A1 = [[2, 0], [0, 0]], norm 2
    b2, a2 = np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])  # B2 A2 = [[0, 1], [1, 0]], norm √2
    weights = [1.0, 3.0]  # p = (1/4, 3/4)
    q1, q2 = 0.25 * 2.0, 0.75 * math.sqrt(2.0)
    q1, q2 = q1 / (q1 + q2), q2 / (q1 + q2)
    new_b, new_a = hetlora_merge([b1, b2], [a1, a2], weights, 2)
    np.testing.assert_allclose(new_b, [[q1 + q2, 0.0], [0.0, q2]], atol=1e-12)
    np.testing.assert_allclose(new_a, [[2 * q1, q2], [q2, 0.0]], atol=1e-12)
    padded_b, padded_a = hetlora_merge([b1, b2], [a1, a2], weights, 3)  # a larger global rank pads with zeros
    np.testing.assert_allclose(padded_b[:, :2], new_b, atol=1e-12)
    assert not padded_b[:, 2].any() and not padded_a[2].any()


def test_hetlora_falls_back_to_example_weights_and_refuses_to_truncate():
    zero_b, zero_a = np.zeros((2, 1)), np.ones((1, 2))
    new_b, new_a = hetlora_merge([zero_b, zero_b], [zero_a, 3 * zero_a], [1.0, 3.0], 1)
    np.testing.assert_allclose(new_a, [[2.5, 2.5]])  # p = (1/4, 3/4) since both updates are zero
    assert not new_b.any()
    with pytest.raises(ValueError, match="exceed"):
        hetlora_merge([np.ones((2, 3))], [np.ones((3, 2))], [1.0], 2)


def fedsvd_round(ranks, rank=8, d_out=40, d_in=30, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    b_global = rng.normal(size=(d_out, rank)).astype(dtype)
    a_global = np.linalg.qr(rng.normal(size=(d_in, rank)))[0].T.astype(dtype)
    bs = [(b_global[:, :r] + rng.normal(size=(d_out, r))).astype(dtype) for r in ranks]
    weights = rng.integers(1, 100, size=len(ranks)).astype(float).tolist()
    return bs, b_global, a_global, weights


def test_hetero_fedsvd_matches_its_closed_form():
    bs, b_global, a_global, weights = fedsvd_round((2, 4, 8, 8))
    p = normalized(weights)
    expected = sum(p_k * (b @ a_global[:b.shape[1]] + b_global[:, b.shape[1]:] @ a_global[b.shape[1]:])
                   for p_k, b in zip(p, bs, strict=True))
    new_b, new_a = hetero_fedsvd_merge(bs, b_global, a_global, weights, 8)
    assert new_b.shape == (40, 8) and new_a.shape == (8, 30)
    np.testing.assert_allclose(new_b @ new_a, expected, rtol=0, atol=1e-10)
    assert_orthonormal_rows(new_a)


def test_hetero_fedsvd_is_fedsvd_when_every_rank_is_full_and_a_noop_round_keeps_the_product():
    bs, b_global, a_global, weights = fedsvd_round((8, 8, 8))
    new_b, new_a = hetero_fedsvd_merge(bs, b_global, a_global, weights, 8)
    mean_b = weighted_mean([{"B": b} for b in bs], weights)["B"]
    ref_b, ref_a = fedsvd_reorthogonalize(mean_b, a_global)
    np.testing.assert_allclose(new_b, ref_b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(new_a, ref_a, rtol=0, atol=1e-10)
    unchanged = [b_global[:, :r].copy() for r in (2, 4, 8)]  # every client sends back what it received
    same_b, same_a = hetero_fedsvd_merge(unchanged, b_global, a_global, [1.0, 2.0, 3.0], 8)
    np.testing.assert_allclose(same_b @ same_a, b_global @ a_global, rtol=0, atol=1e-10)


def test_hetero_fedsvd_keeps_float32_and_rejects_clients_wider_than_the_global_rank():
    bs, b_global, a_global, weights = fedsvd_round((2, 4, 8), dtype=np.float32)
    new_b, new_a = hetero_fedsvd_merge(bs, b_global, a_global, weights, 8)
    assert new_b.dtype == new_a.dtype == np.float32
    assert_orthonormal_rows(new_a, atol=1e-6)
    with pytest.raises(ValueError, match="prefix"):
        hetero_fedsvd_merge([np.ones((40, 9))], b_global, a_global, [1.0], 8)
    with pytest.raises(ValueError, match="prefix"):
        hetero_fedsvd_merge([np.ones((41, 2))], b_global, a_global, [1.0], 8)


def test_flora_stack_adds_the_mean_update_to_the_global_product():
    bs, as_, weights = clients((2, 3, 5))
    rng = np.random.default_rng(9)
    b_global, a_global = rng.normal(size=(40, 4)), rng.normal(size=(4, 30))
    new_b, new_a = flora_stack(b_global, a_global, bs, as_, weights)
    assert new_b.shape == (40, 14) and new_a.shape == (14, 30)
    np.testing.assert_allclose(new_b @ new_a, b_global @ a_global + mean_product(bs, as_, weights), atol=1e-10)
    first_b, first_a = flora_stack(np.zeros((40, 0)), np.zeros((0, 30)), bs, as_, weights)  # first round
    np.testing.assert_allclose(first_b @ first_a, mean_product(bs, as_, weights), atol=1e-10)
    roomy_b, roomy_a = flora_stack(b_global, a_global, bs, as_, weights, max_rank=20)  # 14 <= 20: kept as is
    np.testing.assert_array_equal(roomy_b, new_b)
    np.testing.assert_array_equal(roomy_a, new_a)


def test_flora_truncation_is_the_dense_best_approximation():
    bs, as_, weights = clients((2, 3, 5))
    rng = np.random.default_rng(9)
    b_global, a_global = rng.normal(size=(40, 4)), rng.normal(size=(4, 30))
    new_b, new_a = flora_stack(b_global, a_global, bs, as_, weights, max_rank=6)
    dense_b, dense_a = dense_best(b_global @ a_global + mean_product(bs, as_, weights), 6)
    np.testing.assert_allclose(new_b, dense_b, rtol=0, atol=1e-10 * np.abs(dense_b).max())
    np.testing.assert_allclose(new_a, dense_a, rtol=0, atol=1e-10)


def test_bad_inputs_are_refused_with_a_reason():
    bs, as_, weights = clients((2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        flexlora_merge(bs, as_, [1.0, -1.0], 2)
    with pytest.raises(ValueError, match="one of each"):
        stack_factors(bs, as_, [1.0])
    with pytest.raises(ValueError, match="disagree on the rank"):
        stack_factors(bs, [as_[1], as_[0]], weights)
    with pytest.raises(ValueError, match="layer"):
        stack_factors([bs[0], bs[1][:-1]], as_, weights)
    with pytest.raises(ValueError, match="layer"):
        hetlora_merge(bs, [as_[0], as_[1][:, :-1]], weights, 4)
    with pytest.raises(ValueError, match="layer"):
        flora_stack(np.zeros((39, 0)), np.zeros((0, 30)), bs, as_, weights)
    b_stack, a_stack = stack_factors(bs, as_, weights)
    for rank in (0, 31):
        with pytest.raises(ValueError, match="rank must be in"):
            svd_of_product(b_stack, a_stack, rank)
    with pytest.raises(ValueError, match="method"):
        svd_of_product(b_stack, a_stack, 2, method="dense")
    with pytest.raises(ValueError, match="matrices"):
        product_norm(np.ones(3), np.ones((1, 3)))


def test_flexlora_reuses_its_stack_buffers_without_aliasing_results():
    """Consecutive merges of different shapes (grow, shrink, other dtype) through the per-thread workspace
    give what fresh stacks give, and a later merge never changes an earlier result."""
    cases = [clients((4, 8, 16), d_out=50, d_in=40, seed=1), clients((32, 32, 16, 8), d_out=70, d_in=60, seed=2),
             clients((2, 3), d_out=30, d_in=20, seed=3),
             clients((4, 8), d_out=50, d_in=40, seed=4, dtype=np.float32)]
    results = []
    for bs, as_, weights in cases:
        new_b, new_a = flexlora_merge(bs, as_, weights, 4)
        fresh_b, fresh_a = svd_of_product(*stack_factors(bs, as_, weights), 4)
        np.testing.assert_array_equal(new_b, fresh_b)
        np.testing.assert_array_equal(new_a, fresh_a)
        results.append((new_b.copy(), new_a.copy(), new_b, new_a))
    for copy_b, copy_a, new_b, new_a in results:
        np.testing.assert_array_equal(copy_b, new_b)
        np.testing.assert_array_equal(copy_a, new_a)
    b_stack, _ = stack_factors(*cases[0])
    again, _ = stack_factors(*cases[0])
    assert not np.shares_memory(b_stack, again)  # the public stacks are always fresh
