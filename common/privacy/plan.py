"""A client's privacy plan, checked before it trains: a ConfigError that names the number, not a run of noise.

The plan is the run config plus the one number only the client's data gives: n, its training examples
(the sample rate is 1/ceil(n / batch-size)). The client checks it before round 0 or 1 writes its
ledger; the demo checks every simulated client's plan before any process starts.
"""

from __future__ import annotations

import math

from common.adapters.registry import init_summary, private_init_steps
from common.config import RunConfig
from common.errors import ConfigError
from common.privacy.accounting import PrivacyStep, describe_needed_noise, epsilon_of, noise_or_inf, poisson_sample_rate

MAX_NOISE_MULTIPLIER = 50.0
"""The most noise a calibrated run may need. Each DP-SGD step adds noise of std sigma * C, along every
direction, to a sum of about `batch-size` gradients clipped to C: at sigma = 50 the noise matches 50
perfectly aligned gradients, nearly a whole default batch (64), so training learns (almost) nothing. A
target that needs more is nearly always a mistake (epsilon 0.08 for 8, or far more planned steps than
meant), better stopped than run."""


def planned_dp_steps(config: RunConfig) -> int:
    """DP-SGD steps a client plans for the whole run: its planned rounds, plus the private init step."""
    return config.planned_rounds * config.local_steps + private_init_steps(config)


def check_delta(delta: float, num_examples: int) -> None:
    """ConfigError unless delta < 1/n: publishing one random record in the clear is already (0, 1/n)-DP."""
    if delta >= 1.0 / num_examples:
        suggestion = 10.0 ** math.floor(math.log10(1.0 / (10 * num_examples)))
        raise ConfigError(
            f"delta = {delta:g} is not below 1/n = {1.0 / num_examples:.3g} for a client with n = {num_examples} "
            f"training examples (such a delta allows leaking a whole record); give e.g. delta = {suggestion:g}"
        )


def check_init_budget(config: RunConfig, num_examples: int) -> None:
    """ConfigError if an init that reads the clients' data (`init-data = "private"`: LoRA-SB, LoRA-GA) has no
    budget: at the given noise-multiplier, its one DP step alone spends more than target-epsilon.

    A calibrated noise always leaves room for it (the calibration counts the step, `planned_dp_steps`); a
    public split (`init-data = "public"`) costs nothing. Without this check every client would refuse round 0.
    """
    if not private_init_steps(config) or not math.isfinite(config.target_epsilon):
        return
    rate = poisson_sample_rate(num_examples, config.batch_size)
    spent = epsilon_of([PrivacyStep(0, config.noise_multiplier, rate, 1)], config.delta, config.accountant)
    if spent > config.target_epsilon:
        raise ConfigError(
            f"init-data = 'private' has no budget for the {init_summary(config)['name']} init: its one DP step on a "
            f"client's data alone spends epsilon {spent:.3g} > target-epsilon = {config.target_epsilon:g} "
            f"(noise-multiplier = {config.noise_multiplier:g}, sample rate {rate:.3g}, n = {num_examples}); use "
            f"init-data = 'public' (the server's public split, no privacy cost), or raise target-epsilon or "
            f"noise-multiplier")


def check_privacy_plan(config: RunConfig, num_examples: int) -> None:
    """ConfigError if a client with `num_examples` training examples cannot train this run privately.

    That is: delta >= 1/n, meeting target-epsilon over the planned steps needs more noise than
    MAX_NOISE_MULTIPLIER, or a private data-driven init has no budget (`check_init_budget`). A non-private
    run (target-epsilon = inf) has nothing to check.
    """
    if not config.private:
        return
    check_delta(config.delta, num_examples)
    if config.noise_multiplier > 0:
        check_init_budget(config, num_examples)
        return
    rate = poisson_sample_rate(num_examples, config.batch_size)
    steps = planned_dp_steps(config)
    noise = noise_or_inf(config.target_epsilon, config.delta, rate, steps, config.accountant)
    if noise > MAX_NOISE_MULTIPLIER:
        needed = describe_needed_noise(noise)
        raise ConfigError(
            f"target-epsilon = {config.target_epsilon:g} cannot be met sensibly: {steps} planned DP steps "
            f"(planned rounds x local-steps) at sample rate {rate:.3g} (n = {num_examples}) need a noise "
            f"multiplier of {needed}, above {MAX_NOISE_MULTIPLIER:g} (noise that drowns the gradients); raise "
            f"target-epsilon, or plan fewer rounds or local-steps"
        )
