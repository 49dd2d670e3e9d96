"""Per-example gradient norms at round 1's start, split into LoRA's B and the rest (the classifier head), with
LoRA's Kaiming-uniform A (FFA-LoRA; FedSVD's round 1) and with A's span re-orthonormalized (FedSVD from round 2).

    python -m simulations.grad_norms [--examples 32] [--seed 1]

Why: DP-SGD clips each example's whole gradient to `max-grad-norm`, so which part dominates the norm decides
how much of the clipped budget B gets, and A's row norms decide how large B's gradient and a B step in W are
(README, Results: FedSVD and FFA-LoRA at one lr). Non-private diagnostics on one client's training examples
(the cpu.toml data: 8 Dirichlet clients, 400 examples a class), run by hand; nothing is sent or recorded.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common.config import RunConfig
from common.data.partition import client_data
from common.model import build_model
from common.tensors import encode


def per_example_norms(model: torch.nn.Module, data, count: int) -> np.ndarray:
    """(count, 3): the gradient norm of every lora_B, of every other trainable tensor, and of both, per example."""
    rows = []
    for i in range(count):
        ids, mask, labels = (t[i:i + 1] for t in data.tensors)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        squares = {"b": 0.0, "rest": 0.0}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                squares["b" if "lora_B" in name else "rest"] += float(parameter.grad.pow(2).sum())
        rows.append((squares["b"] ** 0.5, squares["rest"] ** 0.5, (squares["b"] + squares["rest"]) ** 0.5))
    return np.array(rows)


def orthonormalize_a(model: torch.nn.Module) -> None:
    """Give every LoRA layer orthonormal rows spanning its A's row space: FedSVD's A up to an r x r rotation,
    which changes no norm below (|R A x| = |A x|)."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "lora_B"):
                a = module.lora_A.weight
                q, _ = np.linalg.qr(a.double().numpy().T)
                module.lora_A.weight.copy_(torch.from_numpy(q.T.copy()).to(a.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = RunConfig(strategy="ffa_lora", examples_per_class=400, seed=args.seed, partitioner="dirichlet")
    data = client_data(config, 0, 8)
    adapted = build_model(config, num_labels=len(data.train.label_names))
    model = adapted.model
    for name, parameter in model.named_parameters():
        if "lora_A" in name:
            parameter.requires_grad_(False)
    model.train()
    encoded = encode(adapted.tokenizer, data.train, config.max_seq_len)
    count = min(args.examples, len(data.train.texts))
    kaiming = per_example_norms(model, encoded, count)
    orthonormalize_a(model)
    orthonormal = per_example_norms(model, encoded, count)
    print(f"{count} examples of client 0, max-grad-norm {config.max_grad_norm}; medians of per-example norms:")
    for name, norms in (("Kaiming-uniform A", kaiming), ("orthonormal A", orthonormal)):
        b, rest, total = np.median(norms, axis=0)
        clipped = float(np.mean(norms[:, 2] > config.max_grad_norm))
        print(f"  {name:18s} B {b:.3f}  head and rest {rest:.3f}  total {total:.3f}  clipped {clipped:.0%}")
    print(f"  B's norm, orthonormal / Kaiming A: median {np.median(orthonormal[:, 0] / kaiming[:, 0]):.2f}")


if __name__ == "__main__":
    main()
