"""The privacy report's row(s) for the adapter init before round 1 (LoRA-SB, LoRA-GA, PiSSA): what it cost.

A data-driven init reads the server's public split (no cost) or takes one DP-SGD step on each client's
private data, charged to its ledger as round 0 (`client/adapter_init.py`); a data-free init (PiSSA) reads
nothing. The cost shown is that step's own epsilon, recomputed from the ledger's round-0 rows. Each
client's "epsilon spent" already includes it: the accountant composes the rounds, so the costs do not add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.privacy import PrivacyStep, epsilon_of

INIT_ROUND = 0


@dataclass(frozen=True)
class InitCost:
    """One party's part of the init (None: not applicable, e.g. no DP step)."""

    who: str  # a client id, or the party that ran a free init
    steps: int | None
    noise: float | None
    sample_rate: float | None
    epsilon: float | None  # the init step's own epsilon; None where nothing private was spent
    note: str = ""  # why nothing was spent


def init_costs(report: dict) -> tuple[str, str, list[InitCost]] | None:
    """(init name, what it read: "private" / "public" / "none", one row per party); None without an init.

    The run's `init` entry (the ServerApp's `common.adapters.registry.init_summary`) names the init; a report
    without one (older runs) still shows round-0 ledger rows, as a private init of the adapter.
    """
    init = (report.get("run") or {}).get("init")
    charged = {str(c["id"]): [row for row in c["history"] if row["round"] == INIT_ROUND] for c in report["clients"]}
    if init is None and not any(charged.values()):
        return None
    name, data = (str(init.get("name")), str(init.get("data"))) if init else ("adapter", "private")
    if data == "none":
        return name, data, [InitCost("every party", None, None, None, None, "computed from the pretrained weights")]
    if data == "public":
        return name, data, [InitCost("server", None, None, None, None, "the server's public split")]
    rows = []
    for client, history in charged.items():
        if not history:
            rows.append(InitCost(client, 0, None, None, None, "no DP step recorded (not private)"))
            continue
        epsilon = epsilon_of([PrivacyStep.from_dict(row) for row in history], report["delta"], report["accountant"])
        rows.append(InitCost(client, sum(row["steps"] for row in history), history[-1]["noise_multiplier"],
                             history[-1]["sample_rate"], epsilon if math.isfinite(epsilon) else None))
    return name, data, rows


def init_sentence(name: str, data: str) -> str:
    """What the init read and what that cost, in one sentence (plain text; callers escape `name`)."""
    return {
        "none": f"{name} is computed from the pretrained weights alone, by every party: no data read, no privacy "
                "cost.",
        "public": f"{name} read the server's public split (examples no client holds): no privacy cost.",
    }.get(data, f"{name} read the clients' private data: one DP-SGD step on each client, charged to its ledger as "
                "round 0 (its own epsilon below; the epsilon spent above includes it).")
