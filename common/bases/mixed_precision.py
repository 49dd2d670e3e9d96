"""LQ-LoRA's mixed quantization configuration: one config per matrix, chosen by an integer linear program.

Paper Sec. 3.2 (card 37): for each matrix l and each config c, precompute the decomposition error
err_l(c) = ‖W_l - Q_l(c) - L1 L2‖_F² and the storage bits_l(c) * numel_l, then

    minimise Σ_l,c err_l(c) x_lc   s.t.   Σ_c x_lc = 1 for every l,   Σ_l,c bits_c numel_l x_lc <= budget Σ_l numel_l,

with x binary. The paper uses a commercial solver; `scipy.optimize.milp` (HiGHS) solves the same program.
The budget counts the quantized part only: the rank-r factors cost the same under every config.

Config set (decision; the paper searches a larger grid): b0 in {2, 3, 4, 8}, B0 in {64, 128}, scales
double-quantized to 8 bits in blocks of 256. That spans 2.06 to 8.13 bits/param in 8 configs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from common.bases.blockwise import BlockQuantConfig
from common.bases.lq_lora import lq_decompose

LQ_CONFIGS = tuple(BlockQuantConfig(bits, block, 8, 256) for bits in (2, 3, 4, 8) for block in (64, 128))


def error_table(weights: Sequence[torch.Tensor], rank: int, configs: Sequence[BlockQuantConfig] = LQ_CONFIGS,
                iters: int = 3) -> np.ndarray:
    """err[l, c] = squared Frobenius error of the LQ decomposition of matrix l under config c."""
    return np.array([[min(lq_decompose(w, rank, c, iters).errors) ** 2 for c in configs] for w in weights])


def smallest_bits(bits: np.ndarray, numels: np.ndarray) -> float:
    """The lowest achievable average bits/param: every matrix at its cheapest config."""
    return float((bits.min(axis=1) * numels).sum() / numels.sum())


def choose_configs(errors: np.ndarray, bits: np.ndarray, numels: Sequence[int], budget: float) -> list[int]:
    """Index of the chosen config for each matrix, minimising total error within `budget` bits/param.

    errors: (L, C); bits: (C,) or (L, C) bits/param per config; numels: weights per matrix.
    Raises ValueError when the budget is below the smallest achievable average.
    """
    errors = np.asarray(errors, dtype=np.float64)
    count, choices = errors.shape
    bits = np.broadcast_to(np.asarray(bits, dtype=np.float64), (count, choices))
    numels = np.asarray(numels, dtype=np.float64)
    floor = smallest_bits(bits, numels)
    if budget < floor:
        raise ValueError(f"budget = {budget} bits/param is below the smallest achievable {floor:.4f} bits/param "
                         f"(every matrix at its cheapest config); raise the budget to at least {floor:.4f}")
    one_each = np.kron(np.eye(count), np.ones(choices))
    memory = (bits * numels[:, None] / numels.sum()).reshape(1, -1)
    result = milp(
        c=errors.reshape(-1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(memory, -np.inf, budget)],
        integrality=np.ones(count * choices),
        bounds=Bounds(0, 1),
    )
    if not result.success:
        raise RuntimeError(f"the mixed-precision ILP failed: {result.message}")
    return [int(i) for i in result.x.reshape(count, choices).argmax(axis=1)]


def mixed_precision_plan(weights: Mapping[str, torch.Tensor], rank: int, budget: float,
                         configs: Sequence[BlockQuantConfig] = LQ_CONFIGS, iters: int = 3
                         ) -> dict[str, BlockQuantConfig]:
    """Matrix name -> its config, for an average storage of at most `budget` bits/param."""
    names = list(weights)
    table = error_table([weights[n] for n in names], rank, configs, iters)
    bits = np.array([c.bits_per_param for c in configs])
    chosen = choose_configs(table, bits, [weights[n].numel() for n in names], budget)
    return {name: configs[i] for name, i in zip(names, chosen)}
