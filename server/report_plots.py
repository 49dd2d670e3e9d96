"""The privacy report's PNG plots (matplotlib, Agg), each recomputed from `privacy.json` alone.

    privacy_epsilon.png   cumulative epsilon per client versus round (targets dashed)
    privacy_budget.png    budget remaining (target epsilon - spent) per client versus round
    privacy_noise.png     noise multiplier and sampling rate per round (two panels)
    privacy_audit.png     audit lower bound versus reported epsilon, only for a report with audits
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.privacy import PrivacyStep, epsilon_curve

EPSILON_PNG = "privacy_epsilon.png"
BUDGET_PNG = "privacy_budget.png"
NOISE_PNG = "privacy_noise.png"
AUDIT_PNG = "privacy_audit.png"
PLOT_FILES = (EPSILON_PNG, BUDGET_PNG, NOISE_PNG, AUDIT_PNG)


@dataclass(frozen=True)
class Plot:
    """A written plot: its file name in the run directory, a title for the reports, and its bytes."""

    name: str
    title: str
    png: bytes


def write_plots(report: dict, run_dir: Path) -> list[Plot]:
    """Write every plot the report has data for into `run_dir`; remove a stale audit plot."""
    plt = _pyplot()
    plots = [
        (EPSILON_PNG, "Epsilon spent per client", plot_epsilon),
        (BUDGET_PNG, "Budget remaining per client", plot_budget),
        (NOISE_PNG, "Noise multiplier and sampling rate per round", plot_noise),
    ]
    if audited_clients(report):
        plots.append((AUDIT_PNG, "Audit lower bound versus reported epsilon", plot_audit))
    else:
        (run_dir / AUDIT_PNG).unlink(missing_ok=True)  # regenerated from a report that no longer has audits
    written = []
    for name, title, draw in plots:
        fig = draw(report, plt)
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(Plot(name, title, (run_dir / name).read_bytes()))
    return written


def audited_clients(report: dict) -> list[dict]:
    return [client for client in report["clients"] if client.get("audit")]


def plot_epsilon(report: dict, plt):
    """Cumulative epsilon per client versus round."""
    fig, ax = plt.subplots(figsize=(6, 4))
    top, drawn = 0.0, 0
    for client, rounds, curve in _curves(report):
        ax.plot(rounds, curve, marker="o", label=_label(client))
        top, drawn = max([top, *(eps for eps in curve if eps < float("inf"))]), drawn + 1
    user = report.get("user_level")
    if user and user["history"]:
        history = [PrivacyStep.from_dict(row) for row in user["history"]]
        curve = epsilon_curve(history, user["delta"], user["accountant"])
        ax.plot([row.round for row in history], curve, marker="s", color="black", linestyle="-.",
                label=f"user level (delta={user['delta']:g})")
        top, drawn = max([top, *(eps for eps in curve if eps < float("inf"))]), drawn + 1
    for target in sorted({c["target_epsilon"] for c in report["clients"] if c["target_epsilon"] is not None}):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        top = max(top, target)
    ax.set_ylim(0, top * 1.08 or 1.0)  # room above the dashed target line
    if not drawn:
        _note(ax, "no private rounds")
    ax.set_ylabel(f"epsilon (delta={report['delta']:g}, {report['accountant']})")
    ax.set_title("Privacy spent per client")
    return _finish(fig, ax)


def plot_budget(report: dict, plt):
    """Target epsilon minus the epsilon spent after each round, per client with a finite target."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for client, rounds, curve in _curves(report):
        if client["target_epsilon"] is not None:
            ax.plot(rounds, [client["target_epsilon"] - eps for eps in curve], marker="o",
                    label=_label(client))
            drawn += 1
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_ylabel("epsilon remaining (target - spent)")
    ax.set_title("Privacy budget remaining")
    if not drawn:
        _note(ax, "no private client has a finite target epsilon")
    return _finish(fig, ax)


def plot_noise(report: dict, plt):
    """Noise multiplier (top) and Poisson sampling rate (bottom) of every private round, per client."""
    fig, (noise_ax, rate_ax) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
    for client in report["clients"]:
        rows = client["history"]
        if rows:
            rounds = [row["round"] for row in rows]
            noise_ax.plot(rounds, [row["noise_multiplier"] for row in rows], marker="o", label=_label(client))
            rate_ax.plot(rounds, [row["sample_rate"] for row in rows], marker="o", label=_label(client))
    noise_ax.set_ylabel("noise multiplier σ")
    noise_ax.set_ylim(bottom=0)
    noise_ax.set_title("DP-SGD settings per round")
    rate_ax.set_ylabel("sampling rate q")
    rate_ax.set_ylim(bottom=0)
    if not noise_ax.lines:
        _note(noise_ax, "no private rounds")
    _finish(fig, rate_ax, legend=False)
    if noise_ax.lines:
        noise_ax.legend(fontsize="small")
    return fig


def plot_audit(report: dict, plt):
    """Per audited client: the accountant's epsilon beside the audit's empirical lower bound.

    A bound above the epsilon means the accounting or the DP-SGD implementation is wrong.
    """
    clients = audited_clients(report)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(clients))
    reported = [c["epsilon"] if c["epsilon"] is not None else 0.0 for c in clients]
    bounds = [c["audit"]["epsilon_lower_bound"] for c in clients]
    bars = ax.bar([i - 0.2 for i in x], reported, width=0.4, label="reported epsilon (accountant)")
    ax.bar_label(bars, fmt="%.3f", fontsize="small")
    confidences = {c["audit"]["confidence"] for c in clients}
    at = f" ({confidences.pop():.0%} confidence)" if len(confidences) == 1 else ""
    bars = ax.bar([i + 0.2 for i in x], bounds, width=0.4, label=f"audit lower bound{at}")
    ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(list(x), [_label(c) for c in clients])
    ax.set_xlim(-1, len(clients))
    ax.set_ylim(0, max([*reported, *bounds, 0.1]) * 1.25)  # room for the labels and the legend
    ax.set_ylabel("epsilon")
    ax.set_title("Audit bound versus reported epsilon")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _curves(report: dict):
    for client in report["clients"]:
        history = [PrivacyStep.from_dict(row) for row in client["history"]]
        if history:
            yield client, [row.round for row in history], epsilon_curve(history, report["delta"], report["accountant"])


def _label(client: dict) -> str:
    """A legend label for a client-chosen id: `$` would start matplotlib's mathtext (and can fail to parse)."""
    return f"client {client['id']}".replace("$", r"\$")


def _finish(fig, ax, legend: bool = True):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    if legend and any(line.get_label() and not line.get_label().startswith("_") for line in ax.lines):
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
