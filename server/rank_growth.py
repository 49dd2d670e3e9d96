"""Rank growth between rounds (run config `rank-growth`): the server gives more rank to the layers whose
aggregated adapter says they need it (IncreLoRA, card 14; TriAdaptLoRA, card 30).

Why the server: every client of a round must train the same shapes, and the server is the one party that sees
the aggregated adapter. After round t it scores each LoRA layer ℓ from the global state before the round (θ⁻)
and the aggregate after it (θ), picks the layers to grow, and appends one rank to each: a new row of A drawn
from a generator seeded by (seed, layer, round), Kaiming-uniform as LoRA's own A, and a zero column of B. The
product B A, and so every output, is unchanged at the moment of growth (the card's "new components start at
λ = 0"), while the new column of B gets a gradient through the new row of A. The scale s = alpha / rank of
the run's starting rank stays (as `common/ranks.py` keeps alpha / r_max): growing a layer does not rescale
its other ranks. The grown arrays are the next round's broadcast; clients, the server's evaluation, the
checkpoint and the export resize their layers to them (`common.adapters.rank_resize.fit_ranks`).

Privacy: the scores read only θ⁻ (public: the server broadcast it) and θ (the aggregate of the clients'
DP-SGD outputs, after any user-level noise), and the new rows are seeded: growth is post-processing and
costs no privacy. The card's IncreLoRA score |θ ∇θ L| on the clients' raw gradients would be a second read
of private data outside DP-SGD: refused (`rank-growth-scores = "private"`, `common/training/compatibility.py`).

Scores and choices (the cards mark them "unsure"; decided here):
- IncreLoRA: s_ℓ = mean over ℓ's entries of A and B of |θ ⊙ (θ - θ⁻)|, the card's |θ ∇θ L| with the
  round's private update θ - θ⁻ (about -lr times the private gradients) in place of ∇θ L; smoothed across
  rounds, Ī_ℓ <- β Ī_ℓ + (1 - β) s_ℓ (`rank-growth-ema` β; AdaLoRA's 0.85); the `rank-growth-per-round`
  highest Ī_ℓ grow by one rank each. The card's AdaLoRA form P diag(λ) Q with its orthogonality penalty is
  not built: growth acts on LoRA's own B A.
- TriAdaptLoRA: I_ℓ = ‖B A‖_F / √(d_out d_in), the root mean square of ℓ's ΔW / s (s is the same for every
  layer, so it changes neither the order nor the relative threshold); after round t of T, the layers with
  I_ℓ >= (1 - t / T) max I grow, highest first, at most `rank-growth-per-round` (the linear schedule: few
  layers early, more as training goes on). Its triangular split of the factors is not built.
- both: no growth after the last round (its new ranks would never train); Σ_ℓ r_ℓ never exceeds
  `rank-growth-budget` (0 = twice the starting total); a layer stops at min(d_in, d_out); ties go to the
  layer name that sorts first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from common.adapters.lora import seed_for
from server.aggregation import A_SUFFIX, B_SUFFIX, lora_layer_keys
from server.rank_merging import product_norm

Scores = dict[str, float]  # layer name (without `.lora_A.weight`) -> score


@dataclass(frozen=True)
class GrowthSettings:
    budget: int  # Σ_ℓ r_ℓ may reach this; 0 = twice the starting total
    per_round: int  # ranks added after a round, at most one per layer
    ema: float  # IncreLoRA's β
    num_rounds: int
    start_rank: int
    seed: int


def layer_pairs(arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Layer name -> (A, B) for every LoRA layer of `arrays`."""
    return {a_key[: -len(A_SUFFIX)]: (arrays[a_key], arrays[b_key]) for a_key, b_key in lora_layer_keys(arrays)}


def layer_ranks(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    return {name: a.shape[0] for name, (a, _) in layer_pairs(arrays).items()}


def incre_lora_scores(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> Scores:
    """s_ℓ = mean |θ ⊙ (θ - θ⁻)| over the entries of ℓ's A and B."""
    out, start = {}, layer_pairs(before)
    for name, (a, b) in layer_pairs(after).items():
        a0, b0 = start[name]
        total = np.abs(a * (a - a0)).sum(dtype=np.float64) + np.abs(b * (b - b0)).sum(dtype=np.float64)
        out[name] = float(total / (a.size + b.size))
    return out


def tri_adapt_scores(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> Scores:
    """I_ℓ = ‖B A‖_F / √(d_out d_in) (the state after the round; `before` is not needed)."""
    return {name: product_norm(b, a) / math.sqrt(b.shape[0] * a.shape[1])
            for name, (a, b) in layer_pairs(after).items()}


def smoothed(previous: Scores, scores: Scores, beta: float) -> Scores:
    """Ī <- β Ī + (1 - β) s, starting at s for a layer without history."""
    return {name: beta * previous[name] + (1 - beta) * s if name in previous else s for name, s in scores.items()}


def ranked(scores: Scores, eligible: set[str]) -> list[str]:
    """The eligible layers, highest score first, ties by name."""
    return sorted(eligible, key=lambda name: (-scores[name], name))


def incre_lora_choice(scores: Scores, eligible: set[str], room: int, server_round: int, num_rounds: int
                      ) -> list[str]:
    """The `room` highest-scoring layers."""
    return ranked(scores, eligible)[:room]


def tri_adapt_threshold(server_round: int, num_rounds: int) -> float:
    """The linear schedule: a layer grows when I_ℓ >= this x max I (after round t of T: 1 - t / T)."""
    return 1.0 - server_round / num_rounds


def tri_adapt_choice(scores: Scores, eligible: set[str], room: int, server_round: int, num_rounds: int
                     ) -> list[str]:
    """The layers over the threshold, highest first, at most `room`."""
    if not eligible:
        return []
    top = max(scores[name] for name in eligible)
    if top <= 0:
        return []
    bar = tri_adapt_threshold(server_round, num_rounds) * top
    return [name for name in ranked(scores, eligible) if scores[name] >= bar][:room]


@dataclass(frozen=True)
class GrowthRule:
    scores: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], Scores]  # (global before, aggregate after)
    choose: Callable[[Scores, set[str], int, int, int], list[str]]  # (scores, eligible, room, round, rounds)
    smoothed: bool  # scores carried across rounds as IncreLoRA's EMA
    summary: str


RANK_GROWTH: dict[str, GrowthRule] = {
    "incre_lora": GrowthRule(
        scores=incre_lora_scores, choose=incre_lora_choice, smoothed=True,
        summary="IncreLoRA: the layers with the highest smoothed mean |θ ⊙ Δθ| of the aggregated update grow"),
    "tri_adapt_lora": GrowthRule(
        scores=tri_adapt_scores, choose=tri_adapt_choice, smoothed=False,
        summary="TriAdaptLoRA: the layers whose ‖B A‖_F / √(d_out d_in) passes (1 - t/T) x the largest grow"),
}


def budget_of(settings: GrowthSettings, layers: int) -> int:
    return settings.budget or 2 * settings.start_rank * layers


def plan_growth(rule: GrowthRule, before: dict[str, np.ndarray], after: dict[str, np.ndarray], history: Scores,
                settings: GrowthSettings, server_round: int) -> tuple[list[str], Scores]:
    """(the layers that gain a rank after `server_round`, the scores to carry to the next round)."""
    scores = rule.scores(before, after)
    if rule.smoothed:
        scores = smoothed(history, scores, settings.ema)
    if server_round >= settings.num_rounds:
        return [], scores
    pairs = layer_pairs(after)
    ranks = {name: a.shape[0] for name, (a, _) in pairs.items()}
    eligible = {name for name, (a, b) in pairs.items() if a.shape[0] < min(a.shape[1], b.shape[0])}
    room = min(settings.per_round, budget_of(settings, len(pairs)) - sum(ranks.values()))
    if room <= 0:
        return [], scores
    return rule.choose(scores, eligible, room, server_round, settings.num_rounds), scores


def grow(arrays: dict[str, np.ndarray], layers: list[str], seed: int, server_round: int) -> dict[str, np.ndarray]:
    """`arrays` with one more rank on each of `layers`: A gets a seeded Kaiming-uniform row, B a zero column."""
    out = dict(arrays)
    for name in layers:
        a, b = arrays[name + A_SUFFIX], arrays[name + B_SUFFIX]
        bound = 1.0 / math.sqrt(a.shape[1])
        rng = np.random.default_rng(seed_for(seed, f"rank-growth/{name}/round-{server_round}"))
        row = rng.uniform(-bound, bound, size=(1, a.shape[1])).astype(a.dtype)
        out[name + A_SUFFIX] = np.concatenate([a, row], axis=0)
        out[name + B_SUFFIX] = np.concatenate([b, np.zeros((b.shape[0], 1), dtype=b.dtype)], axis=1)
    return out
