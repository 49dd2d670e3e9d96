"""The run configuration: one typed, validated view of `[tool.flwr.app.config]`.

Flower hands the ServerApp and the ClientApp a flat dict with dashed keys (`num-rounds`). Both sides
parse it with `RunConfig.from_flower`, so a bad value fails the same way everywhere, with a one-line
message that names the key and says what would be accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from common.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet")
ACCOUNTANTS = ("rdp", "prv")
# Where a data-driven adapter initialization (LoRA-SB) reads its gradients: a public split held by the
# server (free), or the clients' private data under DP (one DP step each, charged to their budgets).
INIT_DATA = ("public", "private")
# The frozen base the adapters train on (`common/bases/registry.py`): full precision or QLoRA's NF4.
# LQ-LoRA, LoRAM and QLoRAM have their math in common/bases/ but are not selectable in a run yet.
BASES = ("fp32", "nf4")
PLANNED_BASES = ("lq_lora", "loram", "qloram")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; field `num_rounds` is key `num-rounds` in the run config."""

    model: str = ""
    base: str = "fp32"
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
    adapter: str = "lora"
    rank: int = 8
    client_ranks: str = ""
    alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str = "query,value"
    nola_bases: int = 64
    salt_lora_rank: int = 8
    block_lora_blocks: int = 4
    init_data: str = "public"
    public_examples: int = 128
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
    def target_module_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.target_modules.split(",") if name.strip())

    @property
    def planned_rounds(self) -> int:
        """Rounds each client plans to train, used to calibrate the noise multiplier."""
        return max(1, math.ceil(self.num_rounds * self.planned_participation))

    def validate(self) -> None:
        """Range checks that need no registry (strategy and adapter names are checked by their owners)."""
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
        ranks = self.client_rank_list
        if any(r > self.rank for r in ranks):
            raise ConfigError(
                f"client-ranks = {self.client_ranks!r} has a rank above rank = {self.rank}, the largest (global) "
                f"rank r_max: raise rank or lower the client's"
            )

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
    ("rank", _positive, "the adapter rank must be an integer >= 1"),
    ("global_max_rank", lambda v: v >= 0, "must be >= 0 (0 = no truncation of the stacked global adapter)"),
    ("hetlora_prune", lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0 = no rank self-pruning)"),
    ("alpha", lambda v: v > 0 and math.isfinite(v), "must be > 0 (scaling is alpha/rank)"),
    ("lora_dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("nola_bases", _positive, "NOLA needs at least one random basis per factor"),
    ("salt_lora_rank", _positive, "the rank of SALT's LoRA on the remaining subspace must be an integer >= 1"),
    ("block_lora_blocks", _positive, "Block-LoRA splits the input into at least one block"),
    ("init_data", lambda v: v in INIT_DATA, f"choose one of {', '.join(INIT_DATA)}"),
    ("base", lambda v: v in BASES,
     f"choose fp32 (full precision) or nf4 (QLoRA's 4-bit NormalFloat base); {', '.join(PLANNED_BASES)} are "
     f"not selectable in a run yet"),
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
        if type_name == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key} = {value!r} is invalid: expected a value of type {type_name}")
