"""Privacy accounting: per-round history, epsilon by Opacus' accountants, and the client ledger."""

from common.privacy.accounting import (
    PrivacyStep,
    calibrate_noise_multiplier,
    epsilon_curve,
    epsilon_of,
    poisson_sample_rate,
)
from common.privacy.ledger import PrivacyLedger

__all__ = [
    "PrivacyLedger",
    "PrivacyStep",
    "calibrate_noise_multiplier",
    "epsilon_curve",
    "epsilon_of",
    "poisson_sample_rate",
]
