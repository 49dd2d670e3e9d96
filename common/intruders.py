"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

With W0 = U0 Σ0 V0ᵀ and W_ft = U Σ Vᵀ, a top-k left singular vector u_j of W_ft is an *intruder* when
m_j = max_i |cos(u_j, u0_i)| < ε: no pretrained singular direction resembles it. Low-rank LoRA tends to
create high-ranking intruders (and with them forgetting), full fine-tuning does not.

Our choices where the paper leaves them open (the card marks them "unsure"): i runs over the singular
vectors of W0 whose σ > 0 (relative tolerance 1e-10; for a full-rank W0 that is all of U0, so the count
measures directions that are new to W0's column space weighted by rank order); k = 10 and ε = 0.5, the
middle of the ranges the paper sweeps. The metric reads only weights: it costs no privacy.
"""

from __future__ import annotations

import numpy as np

TOP_K = 10
EPSILON = 0.5


def intruder_count(w0: np.ndarray, w_ft: np.ndarray, top_k: int = TOP_K, epsilon: float = EPSILON) -> int:
    """How many of W_ft's top-`top_k` left singular vectors have max |cos| < `epsilon` with W0's."""
    if w0.shape != w_ft.shape:
        raise ValueError(f"W0 is {w0.shape} but W_ft is {w_ft.shape}")
    u0, s0, _ = np.linalg.svd(np.asarray(w0, dtype=np.float64), full_matrices=False)
    live = s0 > 1e-10 * max(float(s0.max(initial=0.0)), 1e-300)
    u, _, _ = np.linalg.svd(np.asarray(w_ft, dtype=np.float64), full_matrices=False)
    top = u[:, :top_k]
    if not live.any():
        return int(top.shape[1])  # nothing pretrained to resemble
    similarity = np.abs(top.T @ u0[:, live]).max(axis=1)  # columns are unit vectors: |u·u0| = |cos|
    return int(np.sum(similarity < epsilon))


def model_intruders(model, top_k: int = TOP_K, epsilon: float = EPSILON) -> dict[str, int]:
    """Intruder count of every adapter layer of a fedlora model (W_ft = W0 + ΔW), by module name."""
    import torch

    from common.adapters.base import AdapterLayer

    counts = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, AdapterLayer) and module.mergeable:  # an input-dependent update has no W_ft
                w0 = module.base.weight.detach().double().cpu().numpy()
                if module.merged:
                    w0 = w0 - module.delta_weight().double().cpu().numpy()
                w_ft = w0 + module.delta_weight().double().cpu().numpy()
                counts[name] = intruder_count(w0, w_ft, top_k, epsilon)
    return counts


def run_intruders(run_dir) -> dict[str, int]:
    """Intruder counts of a finished run's final global model, by adapted layer."""
    from common.export import adapted_with
    from server.export import load_run

    config, arrays, labels = load_run(run_dir)
    return model_intruders(adapted_with(config, arrays, labels).model)


def main(argv: list[str] | None = None) -> None:
    """`python -m common.intruders RUN_DIR`: the counts as JSON on stdout (the sweep runs this in a fresh
    process, so a long sweep reads each run with the code that wrote it)."""
    import argparse
    import json
    from pathlib import Path

    from common.errors import exit_on_user_error

    parser = argparse.ArgumentParser(description="Intruder dimensions of a finished run's global model (JSON).")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    print(json.dumps(exit_on_user_error(run_intruders)(args.run_dir)))


if __name__ == "__main__":
    main()
