"""The linear algebra of aggregation, as pure numpy functions checked against closed forms in tests."""

from __future__ import annotations

import numpy as np


A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def lora_layer_keys(keys) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer among `keys`, sorted by name."""
    return [(k, k[: -len(A_SUFFIX)] + B_SUFFIX) for k in sorted(keys) if k.endswith(A_SUFFIX)]


def mean_of_non_lora(payloads: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean of every tensor that is not a LoRA factor (the classifier head)."""
    keys = [k for k in payloads[0] if not k.endswith((A_SUFFIX, B_SUFFIX))]
    return weighted_mean([{k: p[k] for k in keys} for p in payloads], weights) if keys else {}


def weighted_mean(payloads: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """sum_k w_k x_k / sum_k w_k for every key; all payloads must have the same keys and shapes."""
    if not payloads:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    keys = payloads[0].keys()
    out = {}
    for key in keys:
        acc = np.zeros(payloads[0][key].shape, dtype=np.float64)
        for payload, weight in zip(payloads, weights, strict=True):
            acc += payload[key].astype(np.float64) * (weight / total)
        out[key] = acc.astype(payloads[0][key].dtype)
    return out


def update_norm(payload: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of `payload - reference` over every key of `payload`, all tensors as one vector."""
    return float(np.sqrt(sum(np.sum((payload[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)
                             for k in payload)))


def clip_update(payload: dict[str, np.ndarray], reference: dict[str, np.ndarray], bound: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """(reference + (payload - reference) * min(1, bound / norm), norm): the update scaled to norm <= bound.

    The server-side norm bound (`max-update-norm`): after it, one client moves an example-weighted mean
    by at most its weight share times `bound`, however large the update it sent.
    """
    norm = update_norm(payload, reference)
    if norm <= bound:
        return payload, norm
    scale = bound / norm
    clipped = {k: (reference[k].astype(np.float64) + (v.astype(np.float64) - reference[k]) * scale).astype(v.dtype)
               for k, v in payload.items()}
    return clipped, norm


def fedsvd_reorthogonalize(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B', A') with B' A' = B A, A' with orthonormal rows and B' = U_r Σ_r, without forming B A.

    B A = Q_b R_b (Q_a R_a)^T = Q_b (R_b R_a^T) Q_a^T; the SVD of the r x r core, U Σ V^T, gives
    B A = (Q_b U) Σ (Q_a V)^T. Cost O((d_in + d_out) r^2) instead of O(d_out d_in min(d_out, d_in)).
    """
    dtype = b.dtype
    q_b, r_b = np.linalg.qr(b.astype(np.float64))
    q_a, r_a = np.linalg.qr(a.astype(np.float64).T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    new_b = (q_b @ u) * s
    new_a = vt @ q_a.T
    new_b, new_a = _canonical_signs(new_b, new_a)
    return new_b.astype(dtype), new_a.astype(dtype)


def fedsvd_reorthogonalize_dense(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: SVD of the dense d_out x d_in product (what the QR route avoids)."""
    rank = b.shape[1]
    u, s, vt = np.linalg.svd(b.astype(np.float64) @ a.astype(np.float64), full_matrices=False)
    new_b, new_a = _canonical_signs(u[:, :rank] * s[:rank], vt[:rank])
    return new_b.astype(b.dtype), new_a.astype(a.dtype)


def _canonical_signs(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip each rank-1 pair (b_k, a_k) -> (-b_k, -a_k) so a_k's largest-magnitude entry is positive.

    The SVD fixes singular vectors only up to sign; this makes every route return the same factors.
    """
    pivots = a[np.arange(a.shape[0]), np.abs(a).argmax(axis=1)]
    signs = np.where(pivots < 0, -1.0, 1.0)
    return b * signs, a * signs[:, None]
