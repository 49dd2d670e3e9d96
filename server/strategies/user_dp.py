"""User-level DP as a wrapper around any strategy whose aggregation is linear in the clients' payloads.

`with_user_level_dp(FedAvgLoRA)` is FedAvg-LoRA whose round is the mechanism of
common/privacy/user_level.py: Poisson client sampling at q = clients-per-round / population, each update
clipped to C_u, Gaussian noise σ_u C_u on the sum, a fixed denominator (uniform weights). The strategy's
own post-processing (`after_averaging`, e.g. FedSVD's re-orthogonalization) then runs on the noisy
average, which is free: post-processing never costs privacy.

Linear means: the new global state is a weighted sum of the payloads (FedAvg-LoRA, FFA-LoRA, the
averaging step of FedSVD). The rank-heterogeneous strategies stack, truncate or pad factors of different
shapes, where "client update = reply - global" is undefined and one client's influence on the output is
not bounded by the norm of its update: they refuse the wrapper.

Sample-level DP-SGD on the clients is independent of this and may run at the same time; the privacy
report gives both guarantees. What the user-level guarantee covers: the sequence of global adapters (the
model). It does not cover the per-round client statistics in metrics.json (losses, counts, bytes), and the
server keeps no per-client adapters in the run directory in this mode (`clients/` stays empty).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.errors import ConfigError
from common.logs import get_logger
from common.privacy.user_level import UserLevelAccount, noisy_mean_update, plan_user_account, poisson_sample, secure_rng
from server.strategies.base import LoRAStrategy

log = get_logger("server")


def is_linear(cls: type[LoRAStrategy]) -> bool:
    """Is the strategy's merge a weighted sum of same-shaped payloads (plus post-processing)?"""
    return cls.secure_aggregation and not cls.rank_heterogeneous and not cls.fold_global


class UserLevelDP:
    """Mixin: put before a linear LoRAStrategy in the bases (see `with_user_level_dp`)."""

    releases_every_round = True  # base.aggregate_train: no skip for too few replies (that would leak who replied)
    account: UserLevelAccount | None

    def init_user_level(self, config) -> None:
        self.user_config = config
        self.account = None
        self.rng = secure_rng()

    @classmethod
    def from_config(cls, config, run_dir: str):
        strategy = super().from_config(config, run_dir)
        strategy.init_user_level(config)
        return strategy

    # ---- the mechanism -----------------------------------------------------------------------
    def open_account(self, connected: int) -> UserLevelAccount:
        """Fix population, q and σ_u before round 1 (ConfigError, before any training, if they cannot work)."""
        account = plan_user_account(self.user_config, connected)
        log.info("user-level DP: population %d, client sampling q = %.4g, C_u = %g, noise multiplier %.4g, "
                 "denominator %d; %d rounds spend epsilon %.3f at delta %g (%s)", account.population,
                 account.sample_rate, account.clip_norm, account.noise_multiplier, account.denominator,
                 self.user_config.num_rounds, account.epsilon(extra=self.user_config.num_rounds), account.delta,
                 account.accountant)
        return account

    def _sample(self, grid: Grid, server_round: int, all_nodes: bool = False) -> list[int]:
        nodes = super()._sample(grid, server_round, all_nodes=True)
        if all_nodes:
            return nodes
        if self.account is None:
            self.account = self.open_account(len(nodes))
        return sorted(poisson_sample(nodes, self.account.sample_rate, self.rng))

    def aggregate_payloads(self, payloads: list[dict[str, np.ndarray]], weights: list[float], nodes: list[int],
                           server_round: int) -> dict[str, np.ndarray]:
        """global + (Σ clip(Δ_k) + noise) / m on the uplink keys, then the strategy's post-processing."""
        account = self.account
        if not account.allows_another_round():
            raise ConfigError(f"round {server_round}: another user-level release would exceed user-target-epsilon "
                              f"= {account.target_epsilon:g} (spent {account.epsilon():.3f}); the run stops here")
        shapes = {k: self.global_arrays[k].shape for k in self.uplink_keys()}
        deltas = [{k: p[k].astype(np.float64) - self.global_arrays[k] for k in shapes} for p in payloads]
        mean, norms = noisy_mean_update(deltas, shapes, account.clip_norm, account.noise_multiplier,
                                        account.denominator, self.rng)
        account.record(server_round)
        clipped = sum(norm > account.clip_norm for norm in norms)
        log.info("round %d: user-level release of %d update(s) (%d clipped to C_u = %g), user epsilon %.3f",
                 server_round, len(payloads), clipped, account.clip_norm, account.epsilon())
        new = dict(self.global_arrays)
        for key, value in mean.items():
            new[key] = (self.global_arrays[key].astype(np.float64) + value).astype(self.global_arrays[key].dtype)
        return self.after_averaging(new)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.client_adapters = {}  # per-client adapters are not covered by the user-level guarantee: keep none
        if metrics is not None and self.account is not None:
            metrics["user-epsilon"] = float(self.account.epsilon())
        return arrays, metrics

    # ---- checkpointed state --------------------------------------------------------------------
    def state_dict(self):
        state, arrays = super().state_dict()
        state["user_level"] = None if self.account is None else self.account.to_dict()
        return state, arrays

    def load_state_dict(self, state: dict, arrays) -> None:
        super().load_state_dict(state, arrays)
        saved = state.get("user_level")
        self.account = None if saved is None else UserLevelAccount.from_dict(saved)


def with_user_level_dp(cls: type[LoRAStrategy]) -> type[LoRAStrategy]:
    """`cls` with user-level DP; ConfigError for a strategy whose aggregation is not linear."""
    if not is_linear(cls):
        from server.strategies import STRATEGIES

        linear = sorted(name for name, c in STRATEGIES.items() if is_linear(c))
        name = next((n for n, c in STRATEGIES.items() if c is cls), cls.__name__)
        raise ConfigError(f"user-level DP (user-clip-norm > 0) needs a strategy whose aggregation is linear in the "
                          f"client updates; {name!r} is not (it stacks, truncates or pads client factors): use "
                          f"{', '.join(linear)}, or set user-clip-norm = 0")
    return type(f"UserLevel{cls.__name__}", (UserLevelDP, cls), {})
