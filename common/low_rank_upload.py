"""Low-rank uploads: a client sends a matrix's round change as two thin factors instead of the dense matrix.

GaLore on full weights (adapter `full`, `update-rule = "galore"`) moves each ΔW only within the span of its
projectors: one projector per `galore-period` steps, so a round's change D = ΔW_end − ΔW_start has rank at
most k = `galore-rank` x (projectors in the round). The client sends U = u_k s_k (m x k) and V = v_kᵀ (k x n)
from D's SVD under the keys `KEY::lowrank_U`, `KEY::lowrank_V`; the server rebuilds KEY = ΔW_start + U V from
the global it sent. That is exact up to float32 rounding, which the client checks: a change whose rank-k
remainder is above `TOLERANCE` of its norm (a tensor Adam stepped in full, FRUGAL's sign step) goes dense.
Everything is computed from the client's DP output, so it is post-processing and costs no privacy.
"""

from __future__ import annotations

import numpy as np

from common.adapters.full import FULL_FACTOR
from common.payload import PayloadError

U_SUFFIX, V_SUFFIX = "::lowrank_U", "::lowrank_V"
TOLERANCE = 1e-4  # relative Frobenius norm of what rank k leaves out; above it the matrix is sent dense


def change_factors(change: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(U, V) with U V = `change` to float rounding, U m x k, V k x n, k = min(rank, its rank); None when the
    factors would not be smaller than the matrix or the change is not of rank <= `rank`."""
    if change.ndim != 2 or rank * sum(change.shape) >= change.size:
        return None
    u, s, vh = np.linalg.svd(change.astype(np.float64), full_matrices=False)
    total = float(np.sqrt((s**2).sum()))
    if total and float(np.sqrt((s[rank:] ** 2).sum())) > TOLERANCE * total:
        return None
    return (u[:, :rank] * s[:rank]).astype(change.dtype), vh[:rank].astype(change.dtype)


def encode(trained: dict[str, np.ndarray], start: dict[str, np.ndarray], rank: int, keys) -> dict[str, np.ndarray]:
    """`trained` with each of `keys` whose change from `start` has rank <= `rank` replaced by its two factors."""
    wire: dict[str, np.ndarray] = {}
    for key, value in trained.items():
        factors = change_factors(value - start[key], rank) if key in keys and key in start else None
        if factors is None:
            wire[key] = value
        else:
            wire[key + U_SUFFIX], wire[key + V_SUFFIX] = factors
    return wire


def logical_keys(wire_keys) -> set[str]:
    """The tensors a reply stands for: each factor pair counts as its matrix."""
    return {k[: -len(U_SUFFIX)] if k.endswith(U_SUFFIX) else k[: -len(V_SUFFIX)] if k.endswith(V_SUFFIX) else k
            for k in wire_keys}


def decode(wire: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The dense payload: every factor pair rebuilt as start + U V; PayloadError for a broken pair."""
    dense = {k: v for k, v in wire.items() if not k.endswith((U_SUFFIX, V_SUFFIX))}
    for key in sorted(logical_keys(wire) - set(dense)):
        u, v = wire.get(key + U_SUFFIX), wire.get(key + V_SUFFIX)
        if u is None or v is None:
            raise PayloadError(f"{key} has only one of its two low-rank factors")
        if key not in start:
            raise PayloadError(f"low-rank factors for {key}, which is not a tensor of the global state")
        m, n = start[key].shape if start[key].ndim == 2 else (0, 0)
        if u.ndim != 2 or v.ndim != 2 or u.shape[0] != m or v.shape[1] != n or u.shape[1] != v.shape[0] \
                or u.shape[1] > min(m, n):
            raise PayloadError(f"the low-rank factors of {key} are {list(u.shape)} and {list(v.shape)}, which do "
                               f"not multiply to its shape {list(start[key].shape)}")
        dense[key] = (start[key] + u.astype(start[key].dtype) @ v.astype(start[key].dtype)).astype(start[key].dtype)
    return dense


def low_rank_payload(config, trained: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a client sends for its `trained` tensors after a round that began at `start`: with `upload_rank`,
    each full-weight ΔW as its factor pair (`encode`); otherwise `trained` as it is."""
    rank = upload_rank(config)
    if not rank:
        return trained
    return encode(trained, start, rank, {k for k in trained if k.endswith(f"{FULL_FACTOR}.weight")})


def upload_rank(config) -> int:
    """The rank k a client's full-weight changes are sent at (0: dense): GaLore on adapter `full`, k =
    `galore-rank` x the projectors of a round (one every `galore-period` of its `local-steps`)."""
    if config.adapter != "full" or config.update_rule != "galore":
        return 0
    return config.galore_rank * -(-config.local_steps // config.galore_period)
