"""A loss-threshold membership-inference score: how well per-example losses tell training data from unseen data.

`membership_auc(members, non_members)` is the area under the ROC curve of the attack that calls an example a
member when its loss is below a threshold (Yeom et al. 2018), over all thresholds: the probability that a
random member has a lower loss than a random non-member, ties counted half (the Mann-Whitney U statistic
divided by n m). 0.5 = the attacker cannot tell them apart; 1.0 = every member has a lower loss than every
non-member. Unlearning should bring the forgotten data's AUC (against data never seen) back toward 0.5.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata


def membership_auc(member_losses: Sequence[float], non_member_losses: Sequence[float]) -> float:
    """P[loss(member) < loss(non-member)] + P[tie] / 2 (NaN if either side is empty)."""
    members, others = np.asarray(member_losses, dtype=float), np.asarray(non_member_losses, dtype=float)
    if len(members) == 0 or len(others) == 0:
        return float("nan")
    ranks = rankdata(-np.concatenate([members, others]))  # higher rank = lower loss; ties get the mean rank
    u = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(u / (len(members) * len(others)))
