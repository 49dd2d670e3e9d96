"""The run configuration: one typed, validated view of `[tool.flwr.app.config]`.

Flower hands the ServerApp and the ClientApp a flat dict with dashed keys (`num-rounds`). Both sides
parse it with `RunConfig.from_flower`, so a bad value fails the same way everywhere, with a one-line
message that names the key and says what would be accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from common.errors import ConfigError, FedloraError

PARTITIONERS = ("iid", "dirichlet")
ACCOUNTANTS = ("rdp", "prv")
# Where a data-driven adapter initialization (LoRA-SB) reads its gradients: a public split held by the
# server (free), or the clients' private data under DP (one DP step each, charged to their budgets).
INIT_DATA = ("public", "private")
# How LoRA's B A starts (`common/adapters/lora_inits.py`): LoRA's own (B = 0), PiSSA (W0's top-r SVD, data-free)
# or LoRA-GA (the SVD of the full-weight gradient, read where `init-data` says); the last two train on the
# residual base W0 - s B0 A0.
LORA_INITS = ("default", "pissa", "lora_ga")
# The frozen base the adapters train on (`common/bases/registry.py`): full precision, QLoRA's NF4,
# LQ-LoRA's Q + L1 L2, LoRAM's structurally pruned base, QLoRAM's pruned and NF4-quantized one.
BASES = ("fp32", "nf4", "lq_lora", "loram", "qloram")
# How the adapter starts on a compressed base: as the adapter's own init, or EoRA's compensation of the
# quantization error (nf4, qloram: NF4's; lq_lora: that of Q) in the eigenspace of activations on the
# server's public split (`common/bases/eora_init.py`); no privacy cost.
BASE_INITS = ("none", "eora")
# LQ-LoRA's Fisher weighting: "none" (data-free), "public" (diagonal empirical Fisher on the public split,
# `common/bases/fisher.py`; public data, no privacy cost); "private" is refused (see `_validate_base`).
LQ_FISHER = ("none", "public", "private")
# How an unlearning run (`unlearn-client = ID` on a finished run dir) forgets: the stored history (exact:
# re-aggregation, or a replay re-trained by the other clients) or the leaving client's LoKU update.
UNLEARN_ROUTES = ("exact", "loku")
# The cheapest of LQ-LoRA's mixed-precision configs (2 bits, blocks of 128, 8-bit scales in blocks of 256):
# 2 + 8/128 + 32/(128*256) bits/param, the lowest budget the ILP can meet (common/bases/mixed_precision.py).
LQ_MIN_BITS = 2.0634765625
# Server-side rank growth between rounds (`server/rank_growth.py`): none, IncreLoRA's (layers with the highest
# smoothed |θ ⊙ Δθ| of the aggregated update), TriAdaptLoRA's (layers whose normalized ‖B A‖_F passes a
# linearly falling threshold). Both read only the aggregated adapter; "private" scores are refused.
RANK_GROWTHS = ("none", "incre_lora", "tri_adapt_lora")
RANK_GROWTH_SCORES = ("aggregate", "private")
# Which transformer layers train each round (`common/layer_sampling.py`): all (none), LISA's uniform draw,
# OwLore's draw weighted by each layer's outlier ratio on the public split.
LAYER_SAMPLINGS = ("none", "lisa", "owlore")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; field `num_rounds` is key `num-rounds` in the run config."""

    model: str = ""
    base: str = "fp32"
    base_init: str = "none"
    lq_bits: float = 0.0
    lq_iters: int = 3
    lq_fisher: str = "none"
    prune_ratio: float = 0.5
    dataset: str = "wordnet"
    text_column: str = "text"
    label_column: str = "label"
    labels: str = ""
    examples_per_class: int = 400
    global_test_fraction: float = 0.1
    local_test_fraction: float = 0.2
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    num_rounds: int = 3
    clients_per_round: int = 4
    planned_participation: float = 1.0
    local_steps: int = 10
    batch_size: int = 64
    max_seq_len: int = 64
    lr: float = 0.03
    head_lr: float = 0.0
    adapter: str = "lora"
    rank: int = 8
    client_ranks: str = ""
    alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str = "query,value"
    nola_bases: int = 64
    salt_lora_rank: int = 8
    block_lora_blocks: int = 4
    sltrain_density: float = 0.03
    sara_density: float = 0.1
    smora_top_k: int = 2
    diffora_modules: str = ""
    diffora_keep: float = 0.5
    init_data: str = "public"
    public_examples: int = 128
    lora_init: str = "default"
    strategy: str = "fedsvd"
    global_max_rank: int = 0
    hetlora_prune: float = 0.0
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    seed: int = 42
    run_dir: str = ""
    eval_batch_size: int = 128
    min_train_clients: int = 1
    max_update_norm: float = 0.0
    max_examples: int = 10_000_000
    max_reply_mb: float = 512.0
    user_clip_norm: float = 0.0
    user_noise_multiplier: float = 0.0
    user_target_epsilon: float = math.inf
    user_delta: float = 1e-5
    user_population: int = 0
    audit_canaries: int = 0
    audit_client: int = 0
    store_contributions: bool = False
    unlearn_epsilon: float = 1.0
    loku_steps: int = 10
    loku_lr: float = 0.0003
    unlearn_client: str = ""
    unlearn_route: str = "exact"
    update_rule: str = "adam"
    galore_rank: int = 4
    galore_period: int = 10
    galore_scale: float = 0.25
    galore_projection: str = "svd"
    frugal_density: float = 0.25
    frugal_period: int = 10
    frugal_sign_lr_scale: float = 0.1
    rank_schedule: str = "none"
    sora_lambda: float = 0.1
    loss: str = "cross_entropy"
    ba_lora_consistency: float = 1e-4
    ba_lora_diversity: float = 0.0
    ggpo_rho: float = 0.0
    ggpo_grad_weight: float = 0.5
    ggpo_weight_weight: float = 0.5
    allora_eta: float = 2.0
    codyra_kappa: float = 7e-4
    codyra_levels: int = 50
    codyra_dense: float = 0.5
    rank_growth: str = "none"
    rank_growth_scores: str = "aggregate"
    rank_growth_budget: int = 0
    rank_growth_per_round: int = 2
    rank_growth_ema: float = 0.85
    layer_sampling: str = "none"
    layers_per_round: int = 2
    owlore_threshold: float = 5.0
    train_embeddings: bool = False

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's run config (dashed keys); unknown keys are an error."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        values = {}
        for key, value in run_config.items():
            field = known[key]
            values[field.name] = _coerce(key, value, field.type)
        config = cls(**values)
        config.validate()
        return config

    def to_flower(self) -> dict[str, Any]:
        """The dashed-key dict Flower uses (inverse of `from_flower`)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def private(self) -> bool:
        """False only for the non-private reference run (`target-epsilon = inf`)."""
        return math.isfinite(self.target_epsilon) or self.noise_multiplier > 0

    @property
    def user_level(self) -> bool:
        """User-level DP at the server (common/privacy/user_level.py) is on when user-clip-norm > 0."""
        return self.user_clip_norm > 0

    @property
    def target_module_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.target_modules.split(",") if name.strip())

    @property
    def planned_rounds(self) -> int:
        """Rounds each client plans to train, used to calibrate the noise multiplier."""
        return max(1, math.ceil(self.num_rounds * self.planned_participation))

    def validate(self) -> None:
        """Range checks, and the training pieces' combinations (`common/training/compatibility.py`); strategy
        and adapter names are checked by their owners."""
        for name, check, hint in _RULES:
            if not check(getattr(self, name)):
                raise ConfigError(
                    f"{name.replace('_', '-')} = {getattr(self, name)!r} is invalid: {hint}"
                )
        if not self.target_module_names:
            raise ConfigError("target-modules is empty: give e.g. \"query,value\"")
        if self.min_train_clients > self.clients_per_round:
            raise ConfigError(
                f"min-train-clients = {self.min_train_clients} > clients-per-round = {self.clients_per_round}: "
                f"no round could ever aggregate; lower min-train-clients or raise clients-per-round"
            )
        self._validate_user_level()
        self._validate_base()
        # the defaults need no registry import
        if (self.update_rule, self.rank_schedule, self.loss, self.galore_projection, self.ggpo_rho, self.adapter,
                self.rank_growth, self.rank_growth_scores, self.layer_sampling) != (
                "adam", "none", "cross_entropy", "svd", 0.0, "lora", "none", "aggregate", "none"):
            from common.training.compatibility import check_training  # its registries import this module

            check_training(self)
        if self.lora_init != "default":
            from common.adapters.lora_inits import check_lora_init  # the adapter registry imports this module

            check_lora_init(self)
        ranks = self.client_rank_list
        if any(r > self.rank for r in ranks):
            raise ConfigError(
                f"client-ranks = {self.client_ranks!r} has a rank above rank = {self.rank}, the largest (global) "
                f"rank r_max: raise rank or lower the client's"
            )

    def _validate_user_level(self) -> None:
        if not self.user_level:
            if self.user_noise_multiplier > 0 or math.isfinite(self.user_target_epsilon):
                raise ConfigError("user-noise-multiplier / user-target-epsilon are set but user-clip-norm = 0: "
                                  "user-level DP needs a clip norm C_u > 0 for each client's update")
            return
        if self.user_noise_multiplier == 0 and not math.isfinite(self.user_target_epsilon):
            raise ConfigError(f"user-clip-norm = {self.user_clip_norm:g} turns on user-level DP but gives no noise: "
                              "set user-target-epsilon (the noise is calibrated to it) or user-noise-multiplier")
        if self.min_train_clients > 1:
            raise ConfigError(f"min-train-clients = {self.min_train_clients} cannot be combined with user-level DP: "
                              "skipping a round would depend on how many clients replied, which the guarantee does "
                              "not cover (every round is released, its noise needs no minimum); set "
                              "min-train-clients = 1")
        if self.user_population and self.user_population < self.clients_per_round:
            raise ConfigError(f"user-population = {self.user_population} is below clients-per-round = "
                              f"{self.clients_per_round}: give the number of clients in the federation")

    @property
    def client_rank_list(self) -> tuple[int, ...]:
        """`client-ranks` parsed: one rank per partition id (cycled); () = every client uses `rank`."""
        parts = [p.strip() for p in self.client_ranks.split(",") if p.strip()]
        try:
            ranks = tuple(int(p) for p in parts)
        except ValueError:
            ranks = ()
        if len(ranks) != len(parts) or any(r < 1 for r in ranks):
            raise ConfigError(
                f"client-ranks = {self.client_ranks!r} is invalid: give comma-separated integers >= 1, "
                f"e.g. \"4,4,8,8,16,16\" (one per client, cycled), or \"\" for all clients at rank"
            )
        return ranks

    def _validate_base(self) -> None:
        """Settings of one base that another base would silently ignore, and what a run cannot do yet."""
        if self.lq_fisher == "private":
            raise ConfigError("lq-fisher = 'private' is refused: a Fisher of the clients' private data would need "
                              "their DP gradients, charged to their privacy budgets, which fedlora does not do; "
                              "use lq-fisher = 'public' (the server's public split, no privacy cost) or 'none'")
        if self.lq_fisher != "none" and self.base != "lq_lora":
            raise ConfigError(f"lq-fisher = {self.lq_fisher!r} weights LQ-LoRA's decomposition but base = "
                              f"{self.base!r}: set base = 'lq_lora' or lq-fisher = 'none'")
        if self.lq_bits and self.base != "lq_lora":
            raise ConfigError(f"lq-bits = {self.lq_bits:g} is LQ-LoRA's bit budget but base = {self.base!r}: "
                              "set base = 'lq_lora' or lq-bits = 0")
        if self.base in ("lq_lora", "loram", "qloram") and self.client_ranks:
            raise ConfigError(f"client-ranks cannot be combined with base = {self.base!r}: every client must "
                              "train the same adapter shapes on the one base the server built (LQ-LoRA's Q "
                              "depends on the rank); use client-ranks = \"\"")
        if self.base_init == "eora" and self.base in ("fp32", "loram"):
            why = {"fp32": "has no compression error to compensate",
                   "loram": "is pruned, not quantized: its kept weights are W0's own, without an error to "
                            "compensate"}[self.base]
            raise ConfigError(f"base-init = 'eora' needs a quantized base (nf4, qloram or lq_lora): base = "
                              f"{self.base!r} {why}")


RUN_CONFIG_FILE = "run_config.json"  # what the ServerApp writes into every run directory


def finished_run_config(run_dir, *needed: str) -> RunConfig:
    """The run config of a finished run; FedloraError naming every missing file (run_config.json and `needed`)
    for the commands that work on a run directory afterwards (export, merge, audit, unlearning, ...)."""
    from pathlib import Path

    run_dir = Path(run_dir)
    missing = [name for name in (RUN_CONFIG_FILE, *needed) if not (run_dir / name).is_file()]
    if missing:
        raise FedloraError(f"{run_dir} lacks {', '.join(missing)}: give the run directory of a finished run")
    return RunConfig.from_flower(json.loads((run_dir / RUN_CONFIG_FILE).read_text()))


def _positive(v) -> bool:
    return v > 0


def _fraction(v) -> bool:
    return 0.0 < v < 1.0


_RULES = [
    ("num_rounds", _positive, "must be an integer >= 1"),
    ("clients_per_round", _positive, "must be an integer >= 1"),
    ("local_steps", _positive, "must be an integer >= 1"),
    ("batch_size", _positive, "must be an integer >= 1"),
    ("max_seq_len", lambda v: 8 <= v <= 4096, "must be between 8 and 4096 tokens"),
    ("eval_batch_size", _positive, "must be an integer >= 1"),
    ("min_train_clients", _positive, "must be an integer >= 1 (a round needs at least one valid reply)"),
    ("max_update_norm", lambda v: v >= 0 and math.isfinite(v),
     "must be >= 0: the L2 bound on each client's update (0 = no server-side bound)"),
    ("max_examples", _positive, "must be an integer >= 1: replies claiming more examples are rejected"),
    ("max_reply_mb", _positive, "must be > 0 MiB (inf = no limit on a training reply's arrays)"),
    ("lr", lambda v: v > 0 and math.isfinite(v), "must be a positive learning rate"),
    ("head_lr", lambda v: v >= 0 and math.isfinite(v),
     "must be >= 0: the classifier head's own learning rate (0 = lr, like everything else)"),
    ("rank", _positive, "the adapter rank must be an integer >= 1"),
    ("global_max_rank", lambda v: v >= 0, "must be >= 0 (0 = no truncation of the stacked global adapter)"),
    ("hetlora_prune", lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0 = no rank self-pruning)"),
    ("alpha", lambda v: v > 0 and math.isfinite(v), "must be > 0 (scaling is alpha/rank)"),
    ("lora_dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("nola_bases", _positive, "NOLA needs at least one random basis per factor"),
    ("salt_lora_rank", _positive, "the rank of SALT's LoRA on the remaining subspace must be an integer >= 1"),
    ("block_lora_blocks", _positive, "Block-LoRA splits the input into at least one block"),
    ("sltrain_density", lambda v: 0.0 < v <= 1.0, "SLTrain's sparse support is a fraction of W in (0, 1], e.g. 0.03"),
    ("sara_density", lambda v: 0.0 < v <= 1.0,
     "SaRA trains this fraction of each W0, its smallest-magnitude entries: in (0, 1], e.g. 0.1"),
    ("smora_top_k", _positive, "SMoRA activates at least one rank (expert) per token; at most rank"),
    ("diffora_keep", lambda v: 0.0 < v <= 1.0, "DiffoRA keeps a fraction in (0, 1] of the candidate modules"),
    ("init_data", lambda v: v in INIT_DATA, f"choose one of {', '.join(INIT_DATA)}"),
    ("lora_init", lambda v: v in LORA_INITS,
     "choose default (B = 0), pissa (W0's top-r singular triplets, data-free) or lora_ga (the SVD of the "
     "full-weight gradient, on the data init-data names)"),
    ("base", lambda v: v in BASES,
     "choose fp32 (full precision), nf4 (QLoRA's 4-bit NormalFloat), lq_lora (LQ-LoRA: Q + L1 L2), loram "
     "(LoRAM: structurally pruned) or qloram (pruned and NF4)"),
    ("base_init", lambda v: v in BASE_INITS,
     "choose none (the adapter's own init) or eora (EoRA compensation of the quantization error; bases nf4, "
     "qloram, lq_lora)"),
    ("lq_bits", lambda v: v == 0 or (LQ_MIN_BITS <= v and math.isfinite(v)),
     f"give LQ-LoRA's average bits/param budget for the quantized part, at least {LQ_MIN_BITS:.4f} (every "
     f"matrix at 2 bits), e.g. 3.0 or 4.127; or 0 for NF4 everywhere (4.127 bits/param, no ILP)"),
    ("lq_iters", lambda v: 1 <= v <= 100, "LQ-LoRA's alternating decomposition needs 1..100 iterations"),
    ("lq_fisher", lambda v: v in LQ_FISHER, f"choose one of {', '.join(LQ_FISHER)}"),
    ("prune_ratio", _fraction,
     "give the fraction of MLP channels and attention heads LoRAM removes, strictly between 0 and 1 (e.g. 0.5)"),
    ("public_examples", _positive, "the server's public split needs at least one example"),
    ("target_epsilon", lambda v: v > 0, "must be > 0 (use inf for a non-private run)"),
    ("delta", _fraction, "must be in (0, 1), typically 1e-5 or below 1/(number of examples)"),
    ("noise_multiplier", lambda v: v >= 0 and math.isfinite(v), "must be >= 0 (0 = calibrate to target-epsilon)"),
    ("max_grad_norm", lambda v: v > 0 and math.isfinite(v), "must be > 0 (per-sample clipping bound)"),
    ("accountant", lambda v: v in ACCOUNTANTS, f"choose one of {', '.join(ACCOUNTANTS)}"),
    ("partitioner", lambda v: v in PARTITIONERS, f"choose one of {', '.join(PARTITIONERS)}"),
    ("dirichlet_alpha", _positive, "must be > 0 (smaller = more label skew)"),
    ("examples_per_class", lambda v: v >= 0, "must be >= 0 (0 = no cap)"),
    ("global_test_fraction", _fraction, "must be in (0, 1)"),
    ("local_test_fraction", _fraction, "must be in (0, 1)"),
    ("planned_participation", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    ("user_clip_norm", lambda v: v >= 0 and math.isfinite(v),
     "must be >= 0: the L2 bound C_u on each client's whole update under user-level DP (0 = off)"),
    ("user_noise_multiplier", lambda v: v >= 0 and math.isfinite(v),
     "must be >= 0 (0 = calibrate to user-target-epsilon)"),
    ("user_target_epsilon", lambda v: v > 0, "must be > 0 (inf = no target; then give user-noise-multiplier)"),
    ("user_delta", _fraction, "must be in (0, 1) and below 1/(number of clients)"),
    ("user_population", lambda v: v >= 0,
     "must be >= 0: clients in the federation (0 = the nodes connected when round 1 starts)"),
    ("audit_canaries", lambda v: v >= 0, "must be >= 0 (0 = no privacy audit)"),
    ("audit_client", lambda v: v >= 0, "must be the partition id of the audited client (>= 0)"),
    ("unlearn_epsilon", lambda v: v >= 0 and math.isfinite(v),
     "must be >= 0: the epsilon a leaving client may spend on LoKU beyond target-epsilon"),
    ("loku_steps", _positive, "LoKU needs at least one DP-SGD step on the data to forget"),
    ("loku_lr", lambda v: v > 0 and math.isfinite(v), "must be a positive learning rate"),
    ("unlearn_route", lambda v: v in UNLEARN_ROUTES,
     f"choose {' or '.join(UNLEARN_ROUTES)} (server/unlearn_federated.py)"),
    ("galore_rank", _positive, "GaLore's projection rank must be an integer >= 1"),
    ("galore_period", _positive, "GaLore refreshes its projection every this many steps: an integer >= 1"),
    ("galore_scale", lambda v: v > 0 and math.isfinite(v), "GaLore's update scale must be > 0 (paper: 0.25)"),
    ("frugal_density", lambda v: 0.0 <= v <= 1.0,
     "FRUGAL's state-full fraction of each matrix must be in [0, 1] (1 = Adam, 0 = signSGD; paper: 0.25)"),
    ("frugal_period", _positive, "FRUGAL refreshes its subspace every this many steps: an integer >= 1"),
    ("frugal_sign_lr_scale", lambda v: v >= 0 and math.isfinite(v),
     "FRUGAL's signSGD step is lr x this: must be >= 0 (paper: 0.1 for fine-tuning)"),
    ("ba_lora_consistency", lambda v: v >= 0 and math.isfinite(v),
     "BA-LoRA's consistency weight lambda1 must be >= 0 (paper: 1e-4)"),
    ("ba_lora_diversity", lambda v: v >= 0 and math.isfinite(v),
     "BA-LoRA's diversity weight lambda2 must be >= 0 (0 under DP: the term couples the batch)"),
    ("ggpo_rho", lambda v: v >= 0 and math.isfinite(v), "LoRA-GGPO's perturbation scale must be >= 0 (0 = off)"),
    ("ggpo_grad_weight", lambda v: v >= 0 and math.isfinite(v),
     "LoRA-GGPO's weight of the gradient row norm must be >= 0"),
    ("ggpo_weight_weight", lambda v: v >= 0 and math.isfinite(v),
     "LoRA-GGPO's weight of the weight row norm must be >= 0"),
    ("sora_lambda", lambda v: v >= 0 and math.isfinite(v),
     "SoRA's L1 strength must be >= 0 (the gate threshold per step is lr x this; 0 = no pruning)"),
    ("allora_eta", lambda v: v > 0 and math.isfinite(v),
     "ALLoRA's η must be > 0: a row's update is scaled by 1/sqrt(|row|^2 + 1/η^2), η at a zero row"),
    ("codyra_kappa", lambda v: v >= 0 and math.isfinite(v),
     "CoDyRA's largest gate threshold κ must be >= 0 (paper: 7e-4; 0 = no pruning)"),
    ("codyra_levels", lambda v: v >= 2, "CoDyRA's threshold climbs from 0 to κ in this many levels: an integer >= 2"),
    ("codyra_dense", lambda v: 0.0 <= v < 1.0,
     "CoDyRA's dense phase (no pruning) is this fraction of the run's steps: in [0, 1) (paper: 0.5)"),
    ("layer_sampling", lambda v: v in LAYER_SAMPLINGS, f"choose one of {', '.join(LAYER_SAMPLINGS)}"),
    ("layers_per_round", _positive, "LISA / OwLore train at least one transformer layer a round"),
    ("owlore_threshold", lambda v: v > 0 and math.isfinite(v),
     "OwLore counts entries of |W0| x input norm above this multiple of their mean: must be > 0 (OWL: 5 to 10)"),
    ("rank_growth", lambda v: v in RANK_GROWTHS, f"choose one of {', '.join(RANK_GROWTHS)}"),
    ("rank_growth_scores", lambda v: v in RANK_GROWTH_SCORES, f"choose one of {', '.join(RANK_GROWTH_SCORES)}"),
    ("rank_growth_budget", lambda v: v >= 0,
     "must be >= 0: the total rank over all adapted layers the growth may reach (0 = twice the starting total)"),
    ("rank_growth_per_round", _positive, "rank growth adds at least one rank a round: an integer >= 1"),
    ("rank_growth_ema", lambda v: 0.0 <= v < 1.0, "IncreLoRA's score smoothing β must be in [0, 1) (0 = no smoothing)"),
    ("dataset", bool, "give \"wordnet\" or a path to a .csv/.jsonl file"),
]


def _coerce(key: str, value: Any, type_name: str) -> Any:
    """Accept what TOML and `--run-config` produce; reject the rest with a clear message."""
    try:
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_name == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if type_name == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key} = {value!r} is invalid: expected a value of type {type_name}")
