"""FedSA-LoRA (Guo et al. 2025): A is shared and averaged, B is personal and never leaves its client.

The paper's observation: in federated LoRA the A matrices learn what is common to all clients and the B
matrices what is client-specific. So clients train A and B under DP-SGD, send A (and the classifier head,
shared too) and keep their own B on their own disk between rounds (beside their ledger,
`client/personal_state.py`); the server averages A and the head example-weighted and never sends a B.

What the server holds is therefore not a model on its own: its B stays at the initial value (0 for LoRA),
so the server's global evaluation measures base + shared head only (ΔW = B·A = 0). The figure that
means something is the clients' own evaluation: each evaluates the shared A and head with its own B on
its local test split (`client-eval-accuracy` in metrics.json).

Privacy: unchanged. B is trained in the same DP-SGD steps as A (one per-sample clip over all trained
tensors), so the ledger's accounting covers both; B is never released, and the released A is a DP output.
The merge is an example-weighted mean of the payloads, so it is linear (user-level DP, secure aggregation).
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from common.errors import ConfigError
from server.strategies.base import LoRAStrategy


class FedSALoRA(LoRAStrategy):
    personal_factors = ("lora_B",)
    required_factors = ("lora_A", "lora_B")
    adapters = ("lora",)

    @classmethod
    def from_config(cls, config, run_dir: str) -> "FedSALoRA":
        if config.base == "lq_lora" or config.base_init == "eora":
            what = "base = 'lq_lora'" if config.base == "lq_lora" else "base-init = 'eora'"
            raise ConfigError(f"strategy 'fedsa_lora' keeps each client's B on the client, but {what} starts B on "
                              f"the server (its init compensates the base): use base = 'fp32', 'nf4' or 'loram' "
                              f"with base-init = 'none', or another strategy")
        if config.store_contributions:
            raise ConfigError("store-contributions = true cannot be combined with strategy 'fedsa_lora': exact "
                              "unlearning replays the other clients' rounds, which needs their personal B's that "
                              "the server never sees; set store-contributions = false or use fedavg_lora, ffa_lora "
                              "or fedsvd")
        return super().from_config(config, run_dir)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.client_adapters = {}  # a reply is A and the head without its B: not an adapter server.merge can use
        return arrays, metrics
