"""User-level (client-level) DP at the server: the math, as pure functions (DP-FedAvg, McMahan et al. 2018).

Each round the server samples every connected client independently with probability q (Poisson), clips
each sampled client's update Δ_k (the whole adapter delta: every tensor it sends, as one vector) to norm
C_u, adds Gaussian noise N(0, σ_u² C_u² I) to the sum, and divides by the fixed denominator
m = clients-per-round = q · population (the expected number sampled), not by the number that replied:

    new global = global + (Σ_k clip(Δ_k, C_u) + N(0, σ_u² C_u² I)) / m

Adding or removing one client changes the sum by at most C_u, so one round is the sampled Gaussian
mechanism with noise multiplier σ_u at rate q, exactly what Opacus' accountants compose (one "step" per
round). Because the divisor and the noise do not depend on who replied, a client that drops out or whose
reply is rejected contributes a zero update and the guarantee holds unchanged; this is stronger than
calibrating the noise to a minimum number of replies, so no minimum is needed, and a round is released
(noise only, if need be) however few clients replied. Weights are uniform: example weighting would give a
large client more than C_u of sensitivity.

The sampling coins and the noise come from the operating system's entropy (`secure_rng`), never from the
run seed: anyone who knows the seed could otherwise subtract the noise or tell who was sampled.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field

import numpy as np

from common.errors import ConfigError
from common.privacy.accounting import PrivacyStep, describe_needed_noise, epsilon_of, noise_or_inf

# Over the whole update, noise of std σ_u C_u per coordinate against a sum of m updates of norm <= C_u:
# beyond this the noise on the mean is many times any signal (the same bound as sample level, plan.py).
MAX_USER_NOISE_MULTIPLIER = 50.0


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS entropy pool (not reproducible, on purpose)."""
    return np.random.default_rng(secrets.randbits(128))


def client_sampling_rate(clients_per_round: int, population: int) -> float:
    """q = clients-per-round / population: each client's chance to be in a round."""
    if population < clients_per_round:
        raise ConfigError(f"user-level DP: population = {population} clients is below clients-per-round = "
                          f"{clients_per_round}; set user-population to the number of clients in the federation")
    return clients_per_round / population


def poisson_sample(nodes: list[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Each node independently with probability `rate` (what the accountant's q means)."""
    coins = rng.random(len(nodes))
    return [node for node, coin in zip(nodes, coins) if coin < rate]


def clip_delta(delta: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """(delta * min(1, C / ||delta||), ||delta||), all tensors as one float64 vector."""
    norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in delta.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.astype(np.float64) * scale for k, v in delta.items()}, norm


def noisy_mean_update(deltas: list[dict[str, np.ndarray]], shapes: dict[str, tuple[int, ...]], clip_norm: float,
                      noise_multiplier: float, denominator: int, rng: np.random.Generator
                      ) -> tuple[dict[str, np.ndarray], list[float]]:
    """((Σ clip(Δ_k) + N(0, σ² C² I)) / m for every key of `shapes`, the unclipped norms).

    The noise is drawn key by key in sorted order (tests reproduce it with the same generator).
    """
    total = {k: np.zeros(shape, dtype=np.float64) for k, shape in shapes.items()}
    norms = []
    for delta in deltas:
        clipped, norm = clip_delta(delta, clip_norm)
        norms.append(norm)
        for k in total:
            total[k] += clipped[k]
    std = noise_multiplier * clip_norm
    return {k: (total[k] + rng.normal(0.0, std, size=shapes[k])) / denominator for k in sorted(total)}, norms


def check_user_delta(delta: float, population: int) -> None:
    """ConfigError unless delta < 1/population: a larger delta allows releasing one client's update in the clear."""
    if delta >= 1.0 / population:
        suggestion = 10.0 ** math.floor(math.log10(1.0 / (10 * population)))
        raise ConfigError(f"user-delta = {delta:g} is not below 1/population = {1.0 / population:.3g} for "
                          f"{population} clients (such a delta allows leaking a whole client); give e.g. "
                          f"user-delta = {suggestion:g}")


def user_noise_multiplier(target_epsilon: float, delta: float, rate: float, rounds: int, accountant: str) -> float:
    """The smallest σ_u meeting `target_epsilon` over `rounds` releases at rate q; ConfigError if above
    MAX_USER_NOISE_MULTIPLIER (noise that drowns every update)."""
    noise = noise_or_inf(target_epsilon, delta, rate, rounds, accountant)
    if noise > MAX_USER_NOISE_MULTIPLIER:
        needed = describe_needed_noise(noise)
        raise ConfigError(
            f"user-target-epsilon = {target_epsilon:g} cannot be met sensibly: {rounds} rounds at client sampling "
            f"rate q = {rate:.3g} need a user-level noise multiplier of {needed}, above "
            f"{MAX_USER_NOISE_MULTIPLIER:g} (noise that drowns every update); raise user-target-epsilon, run fewer "
            "rounds, or sample fewer clients per round from a larger population")
    return noise


@dataclass
class UserLevelAccount:
    """The server's user-level ledger: the mechanism's settings and one row per released round."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    population: int
    denominator: int
    delta: float
    target_epsilon: float
    accountant: str
    history: list[PrivacyStep] = field(default_factory=list)

    def epsilon(self, extra: int = 0) -> float:
        """Epsilon of the rounds released so far (plus `extra` more), recomputed by the accountant."""
        rows = self.history + [PrivacyStep(-1, self.noise_multiplier, self.sample_rate, 1)] * extra
        return epsilon_of(rows, self.delta, self.accountant)

    def allows_another_round(self) -> bool:
        """Would one more release stay within the target? (tolerance: the calibration's 0.1% bracket)."""
        return not math.isfinite(self.target_epsilon) or self.epsilon(extra=1) <= self.target_epsilon * (1 + 1e-9)

    def record(self, server_round: int) -> None:
        self.history.append(PrivacyStep(server_round, self.noise_multiplier, self.sample_rate, 1))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["history"] = [row.to_dict() for row in self.history]
        out["target_epsilon"] = self.target_epsilon if math.isfinite(self.target_epsilon) else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "UserLevelAccount":
        values = dict(data)
        values["history"] = [PrivacyStep.from_dict(row) for row in values.get("history", [])]
        values["target_epsilon"] = math.inf if values.get("target_epsilon") is None else values["target_epsilon"]
        return cls(**values)


def plan_user_account(config, population: int) -> UserLevelAccount:
    """The account a run config (common.config.RunConfig) opens for `population` clients (the run config's
    user-population if set): q, σ_u (given or calibrated) and the checks, ConfigError before any training."""
    population = config.user_population or population
    rate = client_sampling_rate(config.clients_per_round, population)
    check_user_delta(config.user_delta, population)
    noise = config.user_noise_multiplier or user_noise_multiplier(
        config.user_target_epsilon, config.user_delta, rate, config.num_rounds, config.accountant)
    account = UserLevelAccount(clip_norm=config.user_clip_norm, noise_multiplier=noise, sample_rate=rate,
                               population=population, denominator=config.clients_per_round, delta=config.user_delta,
                               target_epsilon=config.user_target_epsilon, accountant=config.accountant)
    planned = account.epsilon(extra=config.num_rounds)
    if math.isfinite(config.user_target_epsilon) and planned > config.user_target_epsilon * (1 + 1e-9):
        raise ConfigError(f"user-noise-multiplier = {noise:g} spends user-level epsilon {planned:.3f} over "
                          f"{config.num_rounds} rounds at q = {rate:.3g}, above user-target-epsilon = "
                          f"{config.user_target_epsilon:g}: raise the noise, or set user-noise-multiplier = 0 to "
                          "calibrate it")
    return account
