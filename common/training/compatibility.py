"""Combinations of update rule, rank schedule, loss, adapter and rank settings that cannot train correctly.

Run from `RunConfig.validate`, so the server, the demo and every client stop with one line before any data
is read or budget spent. Strategy combinations live with the strategies (`server/strategies/__init__.py`:
SoRA refuses the strategies that re-factor ranks through its `rank_identity_matters`), except rank growth's,
checked here by name (`GROWTH_STRATEGIES`) so that the clients refuse a growth run they could not follow too.
"""

from __future__ import annotations

from common.adapters.registry import ADAPTERS, get_adapter
from common.config import RunConfig
from common.errors import ConfigError
from common.training.galore import PROJECTIONS
from common.training.lora_pro import PLAIN_LORA
from common.training.losses import get_training_loss
from common.training.rank_schedules import get_rank_schedule
from common.training.update_rules import UPDATE_RULES, UpdateRule, get_update_rule

# Rank growth (`server/rank_growth.py`) appends a rank to a layer's B A pair between rounds; these adapters are
# plain pairs (ΔW = s B A, s fixed), and these strategies send every client the whole grown pair and average
# same-shaped replies. The others: ffa_lora rebuilds A from the seed at the starting rank, fedsa_lora keeps
# each client's B on its disk (the server cannot grow it), the rank-heterogeneous ones set ranks themselves.
GROWTH_ADAPTERS = ("lora", "allora")
GROWTH_STRATEGIES = ("fedavg_lora", "fedsvd")
# DyLoRA with client-ranks: client k trains prefixes b <= r_k of the global r_max adapter at scale alpha/b; the
# zero-padded mean keeps every rank where it is, so each global prefix stays a DyLoRA prefix.
NESTED_RANK_STRATEGIES = ("hetlora",)
# Layer sampling (`common/layer_sampling.py`) sends a round's sampled layers only; these strategies average each
# key of the replies on its own (FedSVD re-factors every layer after, which leaves an unchanged B A unchanged).
SAMPLING_STRATEGIES = ("fedavg_lora", "ffa_lora", "fedsvd")


def check_training(config: RunConfig) -> None:
    rule = get_update_rule(config.update_rule)
    _check_update_rule(config, rule)
    _check_loss(config)
    _check_adapter_pieces(config)
    _check_rank_growth(config)
    _check_layer_sampling(config)
    if config.ggpo_rho > 0 and config.adapter not in PLAIN_LORA:
        raise ConfigError(f"ggpo-rho = {config.ggpo_rho:g} perturbs W0 + s B A of plain LoRA layers, and adapter "
                          f"{config.adapter!r} has other factors: use adapter {' or '.join(map(repr, PLAIN_LORA))}, "
                          f"or ggpo-rho = 0")
    schedule = get_rank_schedule(config.rank_schedule)
    if rule.gradient_piece is not None and schedule.adapters:
        raise ConfigError(
            f"update-rule = {config.update_rule!r} cannot be combined with rank-schedule = {config.rank_schedule!r}: "
            f"its correction couples all ranks of a pair through (BᵀB)⁻¹ and (AAᵀ)⁻¹, while the schedule trains a "
            f"rank prefix at scale alpha/b; use rank-schedule = 'none' or update-rule = 'adam'"
        )
    if schedule.adapters and config.adapter not in schedule.adapters:
        raise ConfigError(
            f"rank-schedule = {config.rank_schedule!r} truncates the rank dimension of a LoRA pair B A, and "
            f"adapter {config.adapter!r} {_what_it_trains(config.adapter)}, without a rank the schedule can mask: "
            f"use adapter {' or '.join(repr(a) for a in schedule.adapters)}, or rank-schedule = 'none'"
        )
    if schedule.adapters:
        get_adapter(config.adapter)
        if config.client_ranks and config.strategy not in NESTED_RANK_STRATEGIES:
            raise ConfigError(
                f"rank-schedule = {config.rank_schedule!r} with client-ranks trains nested rank prefixes (client k "
                f"prefixes b <= r_k at scale alpha/b), which strategy {config.strategy!r} would re-factor, stack or "
                f"cluster; use strategy {' or '.join(map(repr, NESTED_RANK_STRATEGIES))} (zero-padded mean of the "
                f"prefixes), or client-ranks = \"\""
            )


def _check_update_rule(config: RunConfig, rule: UpdateRule) -> None:
    if config.galore_projection not in PROJECTIONS:
        raise ConfigError(f"galore-projection = {config.galore_projection!r} is invalid: choose "
                          f"{' or '.join(sorted(PROJECTIONS))}")
    if config.galore_projection != "svd" and not rule.projected:
        users = sorted(name for name, r in UPDATE_RULES.items() if r.projected)
        raise ConfigError(f"galore-projection = {config.galore_projection!r} picks the projector of update-rule "
                          f"{' or '.join(users)}, but update-rule = {config.update_rule!r} would ignore it: set "
                          f"update-rule to one of them or galore-projection = 'svd'")
    if rule.adapters and config.adapter not in rule.adapters:
        raise ConfigError(
            f"update-rule = {config.update_rule!r} corrects the gradients of plain LoRA pairs (ΔW = s B A), and "
            f"adapter {config.adapter!r} {_what_it_trains(config.adapter)}: use adapter "
            f"{' or '.join(repr(a) for a in rule.adapters)}, or update-rule = 'adam'"
        )


def _check_loss(config: RunConfig) -> None:
    """A loss term that couples the examples of a batch breaks per-sample clipping: refused under DP."""
    coupling = get_training_loss(config.loss).batch_coupling(config)
    if coupling and config.private:
        raise ConfigError(
            f"loss = {config.loss!r} with {coupling} couples the examples of a batch, so DP-SGD's per-sample "
            f"clipping would no longer bound one example's influence: set it to 0 under DP, or train without DP "
            f"(target-epsilon = inf)"
        )


def _check_adapter_pieces(config: RunConfig) -> None:
    """Settings an adapter's own training piece would silently ignore or break."""
    if config.adapter == "allora" and config.lora_dropout > 0:
        raise ConfigError(f"lora-dropout = {config.lora_dropout:g} with adapter 'allora': ALLoRA trains without "
                          f"dropout (it only regularizes long runs); set lora-dropout = 0")
    if config.adapter == "sara" and get_update_rule(config.update_rule).projected:
        raise ConfigError(f"update-rule = {config.update_rule!r} projects matrix gradients, and adapter 'sara' trains "
                          f"one vector of values per layer (the projection would never touch it): use update-rule "
                          f"'adam' or 'sgd'")


def _check_rank_growth(config: RunConfig) -> None:
    """Server-side rank growth: scores from the aggregate only, and only where every party can follow the shapes."""
    if config.rank_growth_scores == "private":
        raise ConfigError(
            "rank-growth-scores = 'private' is refused: IncreLoRA's |θ ∇θ L| read from the clients' raw gradients "
            "would use their private data outside DP-SGD, neither noised nor charged to their budgets (fedlora "
            "does not build that path, even without DP); use rank-growth-scores = 'aggregate': the server "
            "scores each layer from the aggregated adapter it received (post-processing, no privacy cost)")
    if config.rank_growth == "none":
        return
    growth = f"rank-growth = {config.rank_growth!r}"
    if config.adapter not in GROWTH_ADAPTERS:
        raise ConfigError(f"{growth} appends ranks to a plain LoRA pair B A, and adapter {config.adapter!r} "
                          f"{_what_it_trains(config.adapter)}: "
                          f"use adapter {' or '.join(map(repr, GROWTH_ADAPTERS))}, or rank-growth = 'none'")
    if config.strategy not in GROWTH_STRATEGIES:
        raise ConfigError(f"{growth} cannot run with strategy {config.strategy!r}: the server grows the global "
                          f"B A that every client must receive whole (ffa_lora rebuilds A from the seed, "
                          f"fedsa_lora keeps B on the clients, the rank-heterogeneous strategies set ranks "
                          f"themselves); use strategy {' or '.join(map(repr, GROWTH_STRATEGIES))}")
    others = [(config.rank_schedule != "none", f"rank-schedule = {config.rank_schedule!r} (it needs one rank "
                                               f"for all layers)", "rank-schedule = 'none'"),
              (config.lora_init != "default", f"lora-init = {config.lora_init!r} (its start B0 A0 has the "
                                              f"starting rank)", "lora-init = 'default'"),
              (config.base not in ("fp32", "nf4") or config.base_init != "none",
               f"base = {config.base!r}, base-init = {config.base_init!r} (the base is built for the starting "
               f"rank)", "base = 'fp32' or 'nf4' with base-init = 'none'"),
              (config.store_contributions, "store-contributions = true (re-aggregating a round without a client "
                                           "would change the growth that followed it)", "store-contributions = false"),
              (bool(config.unlearn_client), "unlearn-client (its replays and LoKU round are not built for grown "
                                            "ranks)", "unlearn-client = \"\"")]
    for bad, what, fix in others:
        if bad:
            raise ConfigError(f"{growth} cannot be combined with {what}: use {fix} or rank-growth = 'none'")


def _check_layer_sampling(config: RunConfig) -> None:
    """LISA / OwLore: replies carry a different set of keys each round, which only per-key averaging follows."""
    if config.layer_sampling == "none":
        return
    from common.layer_sampling import get_layer_sampler

    get_layer_sampler(config.layer_sampling)
    sampling = f"layer-sampling = {config.layer_sampling!r}"
    if config.strategy not in SAMPLING_STRATEGIES:
        raise ConfigError(f"{sampling} cannot run with strategy {config.strategy!r}: each round's replies carry only "
                          f"the sampled layers, which the strategies that average each tensor on its own follow; "
                          f"use strategy {' or '.join(map(repr, SAMPLING_STRATEGIES))}, or layer-sampling = 'none'")
    others = [(config.rank_growth != "none", f"rank-growth = {config.rank_growth!r} (it scores every layer's "
                                             f"update each round)", "rank-growth = 'none'"),
              (config.store_contributions or bool(config.unlearn_client),
               "store-contributions / unlearn-client (exact unlearning replays rounds whose layer sets it does not "
               "store yet)", "store-contributions = false"),
              (config.user_level, f"user-clip-norm = {config.user_clip_norm:g} (user-level DP clips and noises the "
                                  f"whole update, not a round's layers)", "user-clip-norm = 0")]
    for bad, what, fix in others:
        if bad:
            raise ConfigError(f"{sampling} cannot be combined with {what}: use {fix} or layer-sampling = 'none'")


def _what_it_trains(adapter: str) -> str:
    """"trains lora_A, lora_B" (the adapter's trainable factors), for the refusals that name what would work."""
    kind = ADAPTERS.get(adapter)
    return f"trains {', '.join(kind.trainable_factors)}" if kind else "is unknown"
