"""LoKU on a leaving client (METHODS.md card 38): forget its data with LoRA, under DP-SGD, as an ordinary update.

    python -m client.loku RUN_DIR --client ID --num-clients N     # then: python -m server.unlearn ... --approximate

1. Start from the final global model: W_eff = W0 + s B_g A_g in every adapted layer, the global head.
2. Fisher-weighted low-rank init. The row importance of layer W is F[j] = mean over the forget set of
   ||dL_i/dW[j, :]||^2 (empirical Fisher of the cross-entropy, aggregated per row, so the weighted problem
   keeps a closed form), divided by the retain set's F_r (a leaving client forgets all its data and has no
   retain set: F_r = 1 unless a public retain set is given). With D = diag(sqrt(w)), w = F_f / F_r normalized
   to mean 1, B0 A0 = D^-1 SVD_r(D W_eff) is the best rank-r approximation of W_eff in the D-weighted norm.
   The base becomes W_eff - B0 A0 and the LoRA starts at B0 A0 (outputs unchanged), so the adapter holds the
   weights that matter most for the forget data. On the client's private data, F_f is released to the
   client's own training only, but it steers that training: it is computed as a Gaussian mechanism (each
   example's row vector scaled to norm <= 1, summed, noise sigma), charged as one step at sample rate 1.
3. Train only the LoRA (A and B; the head is frozen) on the forget set with the inverted hinge loss
   IHL = 1 + p(y|x) - max_{v != y} p(v|x), under DP-SGD (Poisson sampling, clipping, noise): `loku-steps`.
4. Send it as an ordinary update: the new ΔW = W_eff - B0A0 + s B'A' - W0 is put back into the run's
   travelling form (post-processing, no privacy cost): for strategies that freeze A (ffa_lora, fedsvd),
   B = ΔW A_g^T (A_g A_g^T)^-1 / s (least squares in the global A's row space); otherwise the best rank-r
   factors of ΔW (truncated SVD). What the projection loses is reported (`kept`, the fraction of the change
   ||ΔW - ΔW_g||_F it keeps).

Privacy: the Fisher step and the training steps are one more round (num-rounds + 1) in the client's ledger.
The noise is calibrated so that the ledger's whole history, LoKU included, stays within target-epsilon +
unlearn-epsilon; the ledger's target is raised by unlearn-epsilon (a client that has spent its budget can
still forget, at that stated extra cost). With target-epsilon = inf nothing is charged.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from client.dp_training import DPSettings, fresh_generator, train_locally
from common.adapters.lora import LoRALinear
from common.config import RunConfig, finished_run_config
from common.errors import ConfigError, exit_on_user_error
from common.privacy import PrivacyLedger, PrivacyStep, poisson_sample_rate
from common.privacy.ledger import noise_within_budget
from common.tensors import trim



def inverted_hinge_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """1 + p(y) - max_{v != y} p(v) per example, in [0, 2]; 0 only when p(y) = 0 and one other class has p = 1."""
    probs = logits.float().softmax(dim=-1)
    true = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    others = probs.scatter(1, labels.view(-1, 1), float("-inf")).max(dim=1).values
    loss = 1.0 + true - others
    return loss.mean() if reduction == "mean" else loss


def weighted_low_rank(weight: torch.Tensor, row_weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) with B0 A0 = D^-1 SVD_r(D W), D = diag(sqrt(row_weights)): the minimizer of ||D (W - X)||_F over
    rank-r X (Eckart-Young in the weighted norm). The split is B0 = D^-1 U_r S_r^1/2, A0 = S_r^1/2 V_r^T."""
    d = row_weights.double().clamp_min(1e-12).sqrt()
    u, s, vh = torch.linalg.svd(d[:, None] * weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b0 = (u[:, :rank] * root) / d[:, None]
    a0 = root[:, None] * vh[:rank]
    return b0.to(weight.dtype), a0.to(weight.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def row_fisher(model: nn.Module, data: TensorDataset, device: torch.device, noise_multiplier: float | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{layer: mean over `data` of each row's squared per-example gradient of the layer's weight W_eff}.

    Per example, the gradient is that of the cross-entropy w.r.t. the base weight of every LoRA layer (the
    LoRA branch held fixed: W_eff's gradient equals the base weight's). With `noise_multiplier` set, each
    example's concatenated row vector is scaled to L2 norm <= 1, the vectors are summed, and Gaussian noise of
    std `noise_multiplier` is added before dividing by n (a Gaussian mechanism of sensitivity 1); the result is
    clamped at 0. Without it the exact mean is returned.
    """
    layers = lora_layers(model)
    was_training = model.training
    model.to(device).eval()
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for layer in layers.values():
        layer.base.weight.requires_grad_(True)
    total = {name: torch.zeros(layer.base.out_features, dtype=torch.float64) for name, layer in layers.items()}
    for input_ids, attention_mask, label in zip(*data.tensors):
        ids, mask = trim(input_ids[None], attention_mask[None])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        grads = torch.autograd.grad(F.cross_entropy(logits, label.view(1).to(device)),
                                    [layer.base.weight for layer in layers.values()])
        rows = {name: (g.double() ** 2).sum(dim=1).cpu() for name, g in zip(layers, grads)}
        if noise_multiplier is not None:
            norm = math.sqrt(sum(float((r ** 2).sum()) for r in rows.values()))
            rows = {name: r / max(1.0, norm) for name, r in rows.items()}
        for name, r in rows.items():
            total[name] += r
    for layer in layers.values():
        layer.base.weight.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])
    model.train(was_training)
    n = max(len(data), 1)
    if noise_multiplier is not None:
        generator = generator or fresh_generator(torch.device("cpu"))
        total = {name: t + noise_multiplier * torch.randn(t.shape, generator=generator, dtype=torch.float64)
                 for name, t in total.items()}
    return {name: (t / n).clamp_min(0.0).float() for name, t in total.items()}


def importance(forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """w = F_f / F_r per row, normalized to mean 1 per layer (F_r = 1 without a retain set); floored so that
    D is invertible."""
    out = {}
    for name, f in forget.items():
        ratio = f / retain[name].clamp_min(1e-12) if retain is not None else f.clone()
        ratio = ratio.clamp_min(1e-6 * float(ratio.max().clamp_min(1e-30)))
        out[name] = ratio / ratio.mean()
    return out


@torch.no_grad()
def loku_init(model: nn.Module, weights: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Re-parameterize every LoRA layer at LoKU's start (outputs unchanged); {layer: its original base W0}.

    W_eff = W0 + s B A is split as (W_eff - B0 A0) + s B A with s B A = B0 A0; B, A get the new values.
    """
    originals = {}
    for name, layer in lora_layers(model).items():
        originals[name] = layer.base.weight.detach().clone()
        effective = layer.base.weight + layer.delta_weight()
        b0, a0 = weighted_low_rank(effective, weights[name].to(effective.device), rank)
        root = math.sqrt(layer.scaling)
        layer.base.weight.copy_(effective - b0 @ a0)
        layer.lora_B.weight.copy_(b0 / root)
        layer.lora_A.weight.copy_(a0 / root)
    return originals


def project_update(delta: np.ndarray, scaling: float, rank: int, frozen_a: np.ndarray | None
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    """(A, B) for a dense update ΔW in the run's travelling form: with a frozen A, (None, least-squares B);
    else the best rank-r factors (A = S^1/2 V^T / sqrt(s), B = U S^1/2 / sqrt(s))."""
    if frozen_a is not None:
        a = frozen_a.astype(np.float64)
        b = delta.astype(np.float64) @ a.T @ np.linalg.pinv(a @ a.T) / scaling
        return None, b.astype(np.float32)
    u, s, vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank] / scaling)
    return (root[:, None] * vh[:rank]).astype(np.float32), (u[:, :rank] * root).astype(np.float32)


def calibrate_loku_noise(ledger: PrivacyLedger, loku_round: int, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (one for the Fisher step and the training steps) whose whole history stays
    within the ledger's target; ConfigError if even a very large one does not fit."""
    noise = noise_within_budget(ledger, lambda sigma: [PrivacyStep(loku_round, sigma, 1.0, 1),
                                                       PrivacyStep(loku_round, sigma, sample_rate, steps)])
    if noise is None:
        raise ConfigError(f"client {ledger.client_id}: LoKU does not fit the budget: epsilon {ledger.epsilon():.3f} is "
                          f"already spent of target {ledger.target_epsilon:g} (target-epsilon + unlearn-epsilon); "
                          "raise unlearn-epsilon")
    return noise


@dataclass
class LokuOutcome:
    payload: dict[str, np.ndarray]  # the update in the run's travelling form (uplink keys)
    metrics: dict
    ledger: dict = field(default_factory=dict)  # the client's ledger after LoKU (the reply's privacy record)


def loku_unlearn(model: nn.Module, forget: TensorDataset, *, rank: int, steps: int, lr: float, batch_size: int,
                 max_grad_norm: float, device: torch.device, noise_multiplier: float | None,
                 before_step=None, fisher_generator: torch.Generator | None = None,
                 retain_fisher: dict[str, torch.Tensor] | None = None, grad_sample_mode: str = "hooks",
                 sampling_generator: torch.Generator | None = None, noise_generator: torch.Generator | None = None
                 ) -> dict:
    """Steps 2-3 in place on `model` (LoRA layers, frozen rest); {layer: original W0} for step 4, plus stats.

    The generators are for tests only: by default the sampling and every noise draw are seeded from the OS.
    """
    fisher = row_fisher(model, forget, device, noise_multiplier, fisher_generator)
    originals = loku_init(model, importance(fisher, retain_fisher), rank)
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    result = train_locally(model, forget, steps=steps, batch_size=batch_size, lr=lr,
                           dp=DPSettings(noise_multiplier, max_grad_norm, grad_sample_mode), device=device,
                           before_step=before_step, loss_fn=inverted_hinge_loss,
                           sampling_generator=sampling_generator, noise_generator=noise_generator)
    return {"originals": originals, "steps": result.steps, "first-loss": result.first_loss,
            "train-loss": result.mean_loss}


def travelling_update(model: nn.Module, originals: dict[str, torch.Tensor], global_arrays: dict[str, np.ndarray],
                      uplink: set[str], frozen_a: bool, rank: int) -> tuple[dict[str, np.ndarray], float]:
    """Step 4: (payload with the uplink keys, fraction of the LoKU change the projection keeps)."""
    payload = {k: v for k, v in global_arrays.items() if k in uplink}  # the head and anything LoKU did not touch
    change, lost = 0.0, 0.0
    for name, layer in lora_layers(model).items():
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        delta = (layer.base.weight + layer.delta_weight() - originals[name].to(layer.base.weight.device))
        delta = delta.detach().cpu().double().numpy()
        a_g, b_g = global_arrays[a_key].astype(np.float64), global_arrays[b_key].astype(np.float64)
        a, b = project_update(delta, layer.scaling, rank, a_g if frozen_a else None)
        sent = layer.scaling * b.astype(np.float64) @ (a_g if a is None else a.astype(np.float64))
        change += float(np.sum((delta - layer.scaling * b_g @ a_g) ** 2))
        lost += float(np.sum((delta - sent) ** 2))
        if b_key in uplink:
            payload[b_key] = b
        if a is not None and a_key in uplink:
            payload[a_key] = a
    kept = 1.0 - math.sqrt(lost / change) if change > 0 else 1.0
    return payload, kept


# The strategies whose update LoKU can send as an ordinary reply, and the factors each keeps frozen on the
# clients (server/strategies: FFA-LoRA and FedSVD train B only). `client` never imports `server`, so the
# table is here; tests/test_loku.py checks it against the strategies' own `frozen_factors`.
LOKU_FROZEN_FACTORS = {"fedavg_lora": (), "ffa_lora": ("lora_A",), "fedsvd": ("lora_A",)}


def loku_round(config: RunConfig, client_id: str, partition_id: int, num_partitions: int, ledger_dir: Path,
               global_arrays: dict[str, np.ndarray]) -> LokuOutcome:
    """The leaving client's LoKU round on its own training split, charged to its ledger as round num-rounds + 1."""
    from common.adapters.rank_resize import fit_ranks
    from common.data.partition import client_data
    from common.model import build_model, pick_device
    from common.payload import load_state
    from common.tensors import encode

    if config.adapter != "lora" or config.strategy not in LOKU_FROZEN_FACTORS:
        raise ConfigError(f"LoKU works on adapter = 'lora' with {', '.join(LOKU_FROZEN_FACTORS)}; this run has "
                          f"adapter {config.adapter!r}, strategy {config.strategy!r}")
    frozen = LOKU_FROZEN_FACTORS[config.strategy]
    loku_number = config.num_rounds + 1
    ledger = PrivacyLedger(Path(ledger_dir) / f"client-{client_id}.json", client_id,
                           config.target_epsilon + config.unlearn_epsilon, config.delta, config.accountant)
    data = client_data(config, partition_id, num_partitions)
    sample_rate = poisson_sample_rate(len(data.train), config.batch_size)
    noise = None
    if math.isfinite(config.target_epsilon):
        noise = calibrate_loku_noise(ledger, loku_number, sample_rate, config.loku_steps)
        ledger.charge(PrivacyStep(loku_number, noise, 1.0, 1))  # the Fisher step, before it reads any data
        ledger.open_round(PrivacyStep(loku_number, noise, sample_rate, config.loku_steps))
    adapted = build_model(config, num_labels=len(data.train.label_names))
    fit_ranks(adapted.model, global_arrays)
    load_state(adapted.model, global_arrays)
    forget = encode(adapted.tokenizer, data.train, config.max_seq_len)
    stats = loku_unlearn(adapted.model, forget, rank=config.rank, steps=config.loku_steps, lr=config.loku_lr,
                         batch_size=config.batch_size, max_grad_norm=config.max_grad_norm, device=pick_device(),
                         noise_multiplier=noise, before_step=ledger.count_step if noise is not None else None)
    if noise is not None:
        ledger.close_round(stats["steps"])
    uplink = {k for k in global_arrays if not any(part in frozen for part in k.split("."))}
    payload, kept = travelling_update(adapted.model, stats["originals"], global_arrays, uplink, "lora_A" in frozen,
                                      config.rank)
    metrics = {"round": loku_number, "num-examples": len(data.train), "steps": stats["steps"],
               "first-loss": stats["first-loss"], "train-loss": stats["train-loss"], "noise-multiplier": noise or 0.0,
               "sample-rate": sample_rate, "epsilon": ledger.epsilon() if noise is not None else math.inf,
               "epsilon-budget": ledger.target_epsilon, "kept": kept}
    return LokuOutcome(payload, metrics, ledger.to_dict())


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from safetensors.numpy import load_file, save_file

    parser = argparse.ArgumentParser(description="LoKU on a leaving client: its unlearning update for the server.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--client", required=True, help="client id (= partition id in simulations)")
    parser.add_argument("--num-clients", type=int, required=True, help="number of partitions of the federation")
    parser.add_argument("--ledger-dir", type=Path, help="where the client's ledger is (default RUN_DIR/ledgers)")
    args = parser.parse_args(argv)
    config = finished_run_config(args.run_dir, "adapter.safetensors")
    global_arrays = load_file(str(args.run_dir / "adapter.safetensors"))
    outcome = loku_round(config, args.client, int(args.client), args.num_clients,
                         args.ledger_dir or args.run_dir / "ledgers", global_arrays)
    out = args.run_dir / "unlearn"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"loku-client-{args.client}.safetensors"
    save_file(outcome.payload, str(path))
    path.with_suffix(".json").write_text(json.dumps(outcome.metrics, indent=2))
    m = outcome.metrics
    print(f"client {args.client}: LoKU round {m['round']}, {m['steps']} DP steps (sigma {m['noise-multiplier']:.3f}), "
          f"IHL {m['first-loss']:.3f} -> {m['train-loss']:.3f}, epsilon {m['epsilon']:.3f} of "
          f"{m['epsilon-budget']:g}, projection keeps {m['kept']:.2%} of the change")
    print(f"update: {path} (aggregate it: python -m server.unlearn {args.run_dir} --client {args.client} "
          f"--approximate {path})")


if __name__ == "__main__":
    main()
