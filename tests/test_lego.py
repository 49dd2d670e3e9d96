"""LoRA-LEGO merging (card 23) against closed forms: exact mean, gauge invariance, cluster recovery."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.lego import _kmeans, lego_merge


def clients(ranks, d_out=7, d_in=5, seed=0):
    rng = np.random.default_rng(seed)
    bs = [rng.normal(size=(d_out, r)) for r in ranks]
    as_ = [rng.normal(size=(r, d_in)) for r in ranks]
    return bs, as_


def exact_mean(bs, as_, weights):
    total = float(sum(weights))
    return sum(w / total * (b @ a) for b, a, w in zip(bs, as_, weights))


def fro(x):
    return float(np.linalg.norm(x))


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       weights_seed=st.integers(0, 1000), extra=st.integers(0, 2))
def test_rank_at_least_total_units_gives_the_exact_weighted_mean(ranks, weights_seed, extra):
    bs, as_ = clients(ranks, seed=weights_seed)
    weights = list(np.random.default_rng(weights_seed).uniform(0.1, 5.0, size=len(ranks)))
    rank = sum(ranks) + extra
    b, a = lego_merge(bs, as_, weights, rank)
    assert b.shape == (7, rank) and a.shape == (rank, 5)
    np.testing.assert_allclose(b @ a, exact_mean(bs, as_, weights), atol=1e-10, rtol=1e-10)
    if extra:  # zero padding at the end
        assert np.all(b[:, sum(ranks):] == 0) and np.all(a[sum(ranks):] == 0)


def test_padding_and_zero_units():
    bs, as_ = clients([2, 2])
    bs[0][:, 1] = 0.0  # a zero unit is dropped, so 3 non-zero units fit in rank 3 exactly
    b, a = lego_merge(bs, as_, [1.0, 3.0], 3)
    np.testing.assert_allclose(b @ a, exact_mean(bs, as_, [1.0, 3.0]), atol=1e-10)
    # a zero-weight client contributes nothing
    b, a = lego_merge(bs + [np.ones((7, 4))], as_ + [np.ones((4, 5))], [1.0, 3.0, 0.0], 3)
    np.testing.assert_allclose(b @ a, exact_mean(bs, as_, [1.0, 3.0]), atol=1e-10)
    # all-zero input: zero output of the right shape
    b, a = lego_merge([np.zeros((7, 2))], [np.zeros((2, 5))], [1.0], 4)
    assert b.shape == (7, 4) and a.shape == (4, 5) and not b.any() and not a.any()


def test_gauge_and_permutation_invariance():
    bs, as_ = clients([4, 3, 5], d_out=9, d_in=6, seed=3)
    weights = [2.0, 1.0, 3.0]
    ref_b, ref_a = lego_merge(bs, as_, weights, 3, seed=7)
    ref = ref_b @ ref_a

    rng = np.random.default_rng(11)
    perm_bs, perm_as = [], []
    for b, a in zip(bs, as_):
        perm = rng.permutation(b.shape[1])
        c = rng.uniform(0.1, 10.0, size=b.shape[1]) * rng.choice([-1.0, 1.0], size=b.shape[1])
        perm_bs.append((b * c)[:, perm])
        perm_as.append((a / c[:, None])[perm])
    # the updates themselves are unchanged
    for b, a, pb, pa in zip(bs, as_, perm_bs, perm_as):
        np.testing.assert_allclose(pb @ pa, b @ a, atol=1e-12)
    got_b, got_a = lego_merge(perm_bs, perm_as, weights, 3, seed=7)
    np.testing.assert_allclose(got_b @ got_a, ref, atol=1e-9, rtol=1e-9)
    # reordering the clients does not matter either
    got_b, got_a = lego_merge(perm_bs[::-1], perm_as[::-1], weights[::-1], 3, seed=7)
    np.testing.assert_allclose(got_b @ got_a, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 10.0]])
def test_identical_units_merge_to_that_unit(weights):
    rng = np.random.default_rng(5)
    u, v = rng.normal(size=(8, 1)), rng.normal(size=(1, 6))
    bs, as_ = [], []
    for k in range(4):  # the same unit u vᵀ in a different gauge at each client
        c = [0.5, -2.0, 3.0, -0.1][k]
        bs.append(u * c)
        as_.append(v / c)
    b, a = lego_merge(bs, as_, weights, 1)
    assert b.shape == (8, 1) and a.shape == (1, 6)
    np.testing.assert_allclose(b @ a, u @ v, rtol=1e-10, atol=1e-12)
    # rank 2 with 4 identical units: an empty cluster is re-seeded, and the sum is still preserved
    b, a = lego_merge(bs, as_, weights, 2)
    np.testing.assert_allclose(b @ a, u @ v, rtol=1e-10, atol=1e-12)


def structured_clients(n_clients=5, noise=0.01, seed=0):
    """Each client: noisy copies of 3 orthogonal base units, in random order and gauge."""
    rng = np.random.default_rng(seed)
    d_out, d_in = 12, 10
    base_b = np.eye(d_out)[:, :3] * np.array([3.0, 2.0, 1.0])
    base_a = np.eye(d_in)[:3]
    bs, as_ = [], []
    for _ in range(n_clients):
        b = base_b + noise * rng.normal(size=base_b.shape)
        a = base_a + noise * rng.normal(size=base_a.shape)
        perm = rng.permutation(3)
        c = rng.uniform(0.2, 5.0, size=3) * rng.choice([-1.0, 1.0], size=3)
        bs.append((b * c)[:, perm])
        as_.append((a / c[:, None])[perm])
    return bs, as_


def test_clustering_recovers_three_base_units():
    bs, as_ = structured_clients()
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    b, a = lego_merge(bs, as_, weights, 3, seed=0)
    mean = exact_mean(bs, as_, weights)
    merged = b @ a
    assert fro(merged - mean) / fro(mean) < 0.05
    assert abs(fro(merged) - fro(mean)) <= 1e-8 * fro(mean)
    # the components come out in the order of the base units' magnitudes (3, 2, 1)
    magnitudes = np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)
    np.testing.assert_allclose(magnitudes, [3.0, 2.0, 1.0], rtol=0.05)


def test_cluster_size_scaling_keeps_each_clusters_sum():
    """Unit 0 is sent by 6 clients, unit 1 by 1, unit 2 by 3: the mean weighs them 1, 1/6, 1/2.

    A merged unit must carry its cluster's sum (sqrt(|S|) on each half), not its mean; global norm
    matching alone cannot repair the relative weights of the clusters.
    """
    rng = np.random.default_rng(1)
    d_out, d_in = 10, 8
    units = [(np.eye(d_out)[:, [i]], np.eye(d_in)[[i]]) for i in range(3)]
    holds = [[0, 1, 2], [0, 2], [0, 2], [0], [0], [0]]
    bs, as_ = [], []
    for held in holds:
        b = np.concatenate([units[i][0] + 0.005 * rng.normal(size=(d_out, 1)) for i in held], axis=1)
        a = np.concatenate([units[i][1] + 0.005 * rng.normal(size=(1, d_in)) for i in held], axis=0)
        bs.append(b)
        as_.append(a)
    weights = [1.0] * len(holds)
    b, a = lego_merge(bs, as_, weights, 3)
    mean = exact_mean(bs, as_, weights)
    assert fro(b @ a - mean) / fro(mean) < 0.05
    magnitudes = np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)
    np.testing.assert_allclose(magnitudes, [1.0, 0.5, 1 / 6], rtol=0.05)


def test_without_clustering_structure_lego_is_worse_than_the_svd_bound():
    """Sanity check that the test above can fail: random units at rank 3 are far from the mean."""
    bs, as_ = clients([4, 4, 4], d_out=12, d_in=10, seed=2)
    weights = [1.0, 1.0, 1.0]
    b, a = lego_merge(bs, as_, weights, 3)
    mean = exact_mean(bs, as_, weights)
    # the truncated SVD is the best rank-3 approximation; LEGO cannot beat it
    u, s, vt = np.linalg.svd(mean)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    assert fro(b @ a - mean) >= fro(best - mean) - 1e-12
    assert fro(b @ a - mean) / fro(mean) > 0.05
    assert abs(fro(b @ a) - fro(mean)) <= 1e-8 * fro(mean)


@settings(max_examples=20, deadline=None)
@given(ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4), rank=st.integers(1, 6),
       seed=st.integers(0, 100))
def test_components_are_ordered_by_decreasing_norm(ranks, rank, seed):
    bs, as_ = clients(ranks, seed=seed)
    b, a = lego_merge(bs, as_, [1.0] * len(ranks), rank, seed=seed)
    magnitudes = np.linalg.norm(b, axis=0) * np.linalg.norm(a, axis=1)
    assert np.all(np.diff(magnitudes) <= 1e-12)


def test_deterministic_with_seed_and_dtype_preserved():
    bs, as_ = clients([3, 3, 3], seed=4)
    bs32 = [b.astype(np.float32) for b in bs]
    as32 = [a.astype(np.float32) for a in as_]
    b1, a1 = lego_merge(bs32, as32, [1, 2, 3], 2, seed=9)
    b2, a2 = lego_merge(bs32, as32, [1, 2, 3], 2, seed=9)
    assert b1.dtype == np.float32 and a1.dtype == np.float32
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(a1, a2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[]), "weights"),
    (dict(weights=[1.0, -1.0]), "non-negative"),
    (dict(weights=[0.0, 0.0]), "positive"),
    (dict(weights=[1.0]), "one weight per client"),
    (dict(rank=0), "rank"),
    (dict(iters=0), "iters"),
])
def test_bad_arguments_raise(kwargs, match):
    bs, as_ = clients([2, 2])
    args = dict(weights=[1.0, 1.0], rank=2) | kwargs
    with pytest.raises(ValueError, match=match):
        lego_merge(bs, as_, args.pop("weights"), args.pop("rank"), **args)


def test_bad_shapes_raise():
    bs, as_ = clients([2, 2])
    with pytest.raises(ValueError, match="nothing to merge"):
        lego_merge([], [], [], 2)
    with pytest.raises(ValueError, match="B factors"):
        lego_merge(bs, as_[:1], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="columns must equal"):
        lego_merge([bs[0], bs[1][:, :1]], as_, [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="client 1"):
        lego_merge([bs[0], np.ones((3, 2))], as_, [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="client 1"):
        lego_merge(bs, [as_[0], np.ones((2, 4))], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="2-D"):
        lego_merge([np.ones(3)], [np.ones((1, 5))], [1.0], 1)


def test_kmeans_recovers_two_obvious_clusters():
    rng = np.random.default_rng(0)
    left = rng.normal(size=(10, 2)) * 0.1 + [-5.0, 0.0]
    right = rng.normal(size=(7, 2)) * 0.1 + [5.0, 1.0]
    points = np.concatenate([left, right])
    truth = np.array([0] * 10 + [1] * 7)
    for seed in range(5):
        labels, centroids = _kmeans(points, 2, iters=50, seed=seed)
        same = np.array_equal(labels, truth) or np.array_equal(labels, 1 - truth)
        assert same
        np.testing.assert_allclose(np.sort(centroids[:, 0]), [left[:, 0].mean(), right[:, 0].mean()])
