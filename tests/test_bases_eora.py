"""EoRA closed forms (card 42) and the FedSVD re-factorization of a low-rank start state."""

from __future__ import annotations

import pytest
import torch

from common.bases.blockwise import BlockQuantConfig, fake_quantize
from common.bases.eora import eora, projected_singular_values
from common.bases.fedsvd_form import fedsvd_form

D_OUT, D_IN, N = 40, 32, 200


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _activations(seed=0, n=N):
    """Correlated, anisotropic inputs, as real activations are (so EoRA differs from plain SVD)."""
    mixing = torch.randn(D_IN, D_IN, generator=_gen(seed), dtype=torch.float64)
    scales = torch.logspace(0, -2, D_IN, dtype=torch.float64)
    return (mixing * scales) @ torch.randn(D_IN, n, generator=_gen(seed + 1), dtype=torch.float64)


def _activation_error(e, b, a, x):
    return float(torch.linalg.norm((e - b @ a) @ x) ** 2)


@pytest.mark.parametrize("rank", (2, 8))
def test_error_equals_the_tail_of_the_projected_spectrum(rank):
    e = torch.randn(D_OUT, D_IN, generator=_gen(2), dtype=torch.float64)
    x = _activations()
    b, a = eora(e, x, rank, eps=1e-12)
    tail = float((projected_singular_values(e, x, eps=1e-12)[rank:] ** 2).sum())
    assert _activation_error(e, b, a, x) == pytest.approx(tail, rel=1e-4)


@pytest.mark.parametrize("rank", (1, 4, 8))
def test_beats_plain_svd_on_the_activation_error(rank):
    e = torch.randn(D_OUT, D_IN, generator=_gen(3), dtype=torch.float64)
    x = _activations(seed=5)
    b, a = eora(e, x, rank, eps=1e-12)
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    plain = _activation_error(e, u[:, :rank] * s[:rank], vh[:rank], x)
    assert _activation_error(e, b, a, x) < plain


def test_rank_of_the_error_gives_zero_error():
    e = (torch.randn(D_OUT, 3, generator=_gen(4), dtype=torch.float64)
         @ torch.randn(3, D_IN, generator=_gen(5), dtype=torch.float64))
    x = _activations(n=20)  # fewer samples than d_in: the eps regularisation keeps Λ invertible
    b, a = eora(e, x, 3)
    assert _activation_error(e, b, a, x) <= 1e-16 * float(torch.linalg.norm(e @ x) ** 2) + 1e-20
    assert torch.allclose(b @ a, e, atol=1e-8)


def test_compensates_a_real_quantization_error():
    """On E = W - NF3(W), rank-8 EoRA removes more of the activation error than plain SVD of E."""
    w = torch.randn(D_OUT, D_IN, generator=_gen(6))
    e = (w - fake_quantize(w, BlockQuantConfig(3, 64, 8))).double()
    x = _activations(seed=7)
    b, a = eora(e, x, 8)
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    full = _activation_error(e, torch.zeros(D_OUT, 1, dtype=e.dtype), torch.zeros(1, D_IN, dtype=e.dtype), x)
    ours, plain = _activation_error(e, b, a, x), _activation_error(e, u[:, :8] * s[:8], vh[:8], x)
    assert ours < plain < full


def test_shape_and_rank_errors():
    e = torch.randn(D_OUT, D_IN)
    with pytest.raises(ValueError, match="d_in = 32"):
        eora(e, torch.randn(D_IN + 1, 10), 2)
    with pytest.raises(ValueError, match="rank = 33"):
        eora(e, torch.randn(D_IN, 10), 33)


def test_fedsvd_form_keeps_the_product_with_orthonormal_a():
    e = torch.randn(D_OUT, D_IN, generator=_gen(8), dtype=torch.float64)
    b, a = eora(e, _activations(seed=9), 6)
    new_b, new_a = fedsvd_form(b.float(), a.float())
    assert torch.allclose(new_b @ new_a, (b @ a).float(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(new_a @ new_a.T, torch.eye(6), atol=1e-5)
    norms = torch.linalg.norm(new_b.double(), dim=0)
    assert torch.allclose(norms, torch.linalg.svdvals(b @ a)[:6], rtol=1e-5)
    assert not torch.allclose(a @ a.T, torch.eye(6, dtype=a.dtype), atol=1e-2)  # EoRA's A was not orthonormal
