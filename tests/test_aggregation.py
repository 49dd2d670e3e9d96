"""The aggregation math against closed forms: weighted means and FedSVD's re-orthogonalization."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.aggregation import fedsvd_reorthogonalize, fedsvd_reorthogonalize_dense, weighted_mean


def random_factors(d_out: int, d_in: int, rank: int, seed: int = 0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(d_out, rank)).astype(dtype), rng.normal(size=(rank, d_in)).astype(dtype)


def test_weighted_mean_is_the_example_weighted_closed_form():
    rng = np.random.default_rng(1)
    payloads = [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
                for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    out = weighted_mean(payloads, weights)
    for key in ("a", "b"):
        expected = (10 * payloads[0][key] + 30 * payloads[1][key] + 60 * payloads[2][key]) / 100
        np.testing.assert_allclose(out[key], expected, rtol=1e-6)
        assert out[key].dtype == np.float32


def test_weighted_mean_rejects_nothing_to_average():
    with pytest.raises(ValueError, match="nothing"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean([{"a": np.ones(2)}], [0.0])


@pytest.mark.parametrize("d_out,d_in,rank", [(64, 48, 4), (32, 80, 6), (16, 16, 16)])
def test_qr_route_equals_dense_svd_route(d_out, d_in, rank):
    b, a = random_factors(d_out, d_in, rank)
    new_b, new_a = fedsvd_reorthogonalize(b, a)
    dense_b, dense_a = fedsvd_reorthogonalize_dense(b, a)
    np.testing.assert_allclose(new_b, dense_b, atol=1e-5)
    np.testing.assert_allclose(new_a, dense_a, atol=1e-5)


def test_qr_route_equals_dense_route_in_float32():
    """Clients send float32. Both routes compute in float64 and round once to float32 at the end, so they
    may differ only in that final rounding: a few float32 ulps of the largest entry, not 1e-10."""
    b, a = random_factors(768, 384, 8, dtype=np.float32)
    exact = fedsvd_reorthogonalize_dense(b.astype(np.float64), a.astype(np.float64))
    for ours, reference, truth in zip(fedsvd_reorthogonalize(b, a), fedsvd_reorthogonalize_dense(b, a), exact):
        assert ours.dtype == np.float32
        ulp = np.finfo(np.float32).eps * np.abs(truth).max()
        np.testing.assert_allclose(ours, reference, rtol=0, atol=4 * ulp)
        np.testing.assert_allclose(ours, truth, rtol=0, atol=4 * ulp)


def test_reorthogonalization_keeps_the_product_and_orthonormalizes_a():
    b, a = random_factors(64, 48, 4, seed=3)
    new_b, new_a = fedsvd_reorthogonalize(b, a)
    np.testing.assert_allclose(new_b @ new_a, b @ a, atol=1e-10)
    np.testing.assert_allclose(new_a @ new_a.T, np.eye(4), atol=1e-12)
    gram = new_b.T @ new_b  # B' = U Σ: orthogonal columns whose norms are the singular values, descending
    singular_values = np.linalg.svd(b @ a, compute_uv=False)[:4]
    np.testing.assert_allclose(gram, np.diag(singular_values**2), atol=1e-8)
    # Applying it again changes nothing: the output is already in canonical form.
    again_b, again_a = fedsvd_reorthogonalize(new_b, new_a)
    np.testing.assert_allclose(again_b, new_b, atol=1e-10)
    np.testing.assert_allclose(again_a, new_a, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 40), d_in=st.integers(2, 40), rank=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_reorthogonalization_properties_on_random_shapes(d_out, d_in, rank, seed):
    rank = min(rank, d_out, d_in)
    b, a = random_factors(d_out, d_in, rank, seed)
    new_b, new_a = fedsvd_reorthogonalize(b, a)
    assert new_b.shape == b.shape and new_a.shape == a.shape
    np.testing.assert_allclose(new_b @ new_a, b @ a, atol=1e-9 * max(1.0, np.abs(b @ a).max()))
    np.testing.assert_allclose(new_a @ new_a.T, np.eye(rank), atol=1e-9)
    gram = new_b.T @ new_b
    norms = np.diag(gram)
    np.testing.assert_allclose(gram - np.diag(norms), 0, atol=1e-9 * max(1.0, norms.max()))
    assert np.all(np.diff(norms) <= 1e-9 * max(1.0, norms.max())), "singular values must descend"


def test_averaging_b_with_a_shared_is_exact_but_averaging_both_factors_is_not():
    """Why FFA-LoRA and FedSVD freeze A: mean_k(B_k) A = mean_k(B_k A); mean(B) mean(A) != mean(B A)."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 20))
    bs = [rng.normal(size=(30, 4)) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    mean_b = weighted_mean([{"b": x} for x in bs], weights)["b"]
    mean_product = weighted_mean([{"p": x @ a} for x in bs], weights)["p"]
    np.testing.assert_allclose(mean_b @ a, mean_product, atol=1e-12)

    a_s = [rng.normal(size=(4, 20)) for _ in range(3)]
    mean_a = weighted_mean([{"a": x} for x in a_s], weights)["a"]
    true_mean = weighted_mean([{"p": b_k @ a_k} for b_k, a_k in zip(bs, a_s)], weights)["p"]
    assert np.abs(mean_b @ mean_a - true_mean).max() > 0.1


def lora_init_a(d_in: int = 384, rank: int = 8) -> np.ndarray:
    """The A that every LoRA layer of a run starts from (Kaiming-uniform, as in PEFT), in float64."""
    import torch

    from common.adapters.lora import LoRAConfig, LoRALinear

    layer = LoRALinear(torch.nn.Linear(d_in, d_in), LoRAConfig(rank=rank), "encoder.layer.0.attention.self.query")
    return layer.lora_A.weight.detach().double().numpy()


def row_space_projector(a: np.ndarray) -> np.ndarray:
    return a.T @ np.linalg.solve(a @ a.T, a)


def test_fedsvd_never_moves_a_out_of_the_initial_row_space_whatever_b_holds():
    """B A's rows lie in A's row space, so the re-derived A' spans exactly the rows of the A it came from: round
    after round, a B that is all DP noise only rotates A inside the start's span (it cannot turn A toward
    noise directions of the d_in-dimensional input space)."""
    a0 = lora_init_a()
    start = row_space_projector(a0)
    rng = np.random.default_rng(0)
    b, a = np.zeros((384, 8)), a0
    for _ in range(3):
        b = b + rng.normal(size=b.shape)  # an aggregated update that is pure noise
        b, a = fedsvd_reorthogonalize(b, a)
        np.testing.assert_allclose(row_space_projector(a), start, atol=1e-10)


def test_fedsvd_steps_about_three_times_ffa_lora_in_w_after_one_round_at_the_same_lr():
    """With A frozen, an SGD step on B for a gradient G of W moves W by -lr s^2 G A^T A. LoRA's start A has rows
    of squared norm 1/3 (Kaiming-uniform on d_in = 384), nearly orthogonal, so A^T A ~ P/3; FedSVD's A' after
    one aggregation has orthonormal rows over the same span, A'^T A' = P. So from round 2 on, at one lr,
    FedSVD's SGD step in W is ~3x FFA-LoRA's; a step of fixed size in B (Adam's, about lr per coordinate
    whatever the gradient's scale, or a clipped one) moves W by |A| times it: ~sqrt(3)x. The lr is not matched
    between the two strategies (README, Results)."""
    a0 = lora_init_a()
    np.testing.assert_allclose(np.sum(a0**2, axis=1), 1 / 3, atol=0.06)
    _, a1 = fedsvd_reorthogonalize(np.random.default_rng(1).normal(size=(384, 8)), a0)
    g = np.random.default_rng(2).normal(size=(384, 384))
    ffa_step, fedsvd_step = g @ a0.T @ a0, g @ a1.T @ a1
    assert 0.28 < np.linalg.norm(ffa_step) / np.linalg.norm(fedsvd_step) < 0.39
    # B's gradient G A^T is ~1/sqrt(3) as large under FFA-LoRA's A; clipped to the same norm, the W steps
    # (that clipped gradient times A) then differ by the ratio of A's row norms alone, ~1/sqrt(3).
    assert 0.52 < np.linalg.norm(g @ a0.T) / np.linalg.norm(g @ a1.T) < 0.63
