"""The privacy report: `privacy.json` (recomputable), `privacy.md` and `privacy_epsilon.png`.

Every epsilon here is recomputed from the recorded history (noise multiplier, sample rate, steps per
round) with Opacus' accountant; nothing a client claims about its epsilon is copied.

    python -m server.report RUN_DIR     # re-check privacy.json and rewrite the Markdown and the plot
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common.errors import FedloraError, exit_on_user_error
from common.privacy import PrivacyStep, epsilon_curve, epsilon_of

REPORT_JSON = "privacy.json"
REPORT_MD = "privacy.md"
REPORT_PNG = "privacy_epsilon.png"


def build_report(ledgers: dict[str, dict], *, delta: float, accountant: str, target_epsilon: float,
                 run: dict, faults: list[dict] | None = None) -> dict:
    """The `privacy.json` document for the ledgers the clients reported and the faults the server saw
    (rows of `LoRAStrategy.faults`: round, node, client, kind, reason, action)."""
    clients = []
    for client_id in sorted(ledgers, key=_client_order):
        history = [PrivacyStep.from_dict(row) for row in ledgers[client_id]["history"]]
        clients.append({
            "id": client_id,
            "target_epsilon": _json_number(target_epsilon),
            "epsilon": _json_number(epsilon_of(history, delta, accountant)) if history else None,
            "history": [row.to_dict() for row in history],
        })
    return {"delta": delta, "accountant": accountant, "level": "sample", "clients": clients, "run": run,
            "faults": list(faults or [])}


def describe_fault(fault: dict) -> str:
    """One line for a fault: `round 2, client 3 (node 17): malformed-reply: <reason> -> <action>`."""
    who = "" if fault.get("client") is None else f", client {fault['client']}"
    if fault.get("node") is not None and str(fault["node"]) != str(fault.get("client")):
        who += f" (node {fault['node']})"
    return f"round {fault['round']}{who}: {fault['kind']}: {fault['reason']} -> {fault['action']}"


def recompute(report: dict) -> dict:
    """A copy of `report` whose epsilons are recomputed from the histories."""
    out = json.loads(json.dumps(report))
    for client in out["clients"]:
        history = [PrivacyStep.from_dict(row) for row in client["history"]]
        client["epsilon"] = _json_number(epsilon_of(history, out["delta"], out["accountant"])) if history else None
    return out


def write_report(run_dir: Path, report: dict) -> Path:
    """Write the three report files; return the path of the Markdown report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (run_dir / REPORT_MD).write_text(render_markdown(report))
    plot_epsilon(report, run_dir / REPORT_PNG)
    return run_dir / REPORT_MD


def render_markdown(report: dict) -> str:
    run = report.get("run", {})
    lines = [
        "# Privacy report",
        "",
        f"- Level: **{report['level']}-level** DP-SGD on each client (Opacus: Poisson sampling, per-sample "
        "clipping, Gaussian noise); the server only post-processes the clients' DP outputs.",
        f"- Accountant: `{report['accountant']}` (Opacus), delta = {report['delta']:g}",
        f"- Run: strategy `{run.get('strategy')}`, {run.get('rounds')} rounds, model `{run.get('model')}`, "
        f"dataset `{run.get('dataset')}`",
        "",
        "| client | rounds trained | steps | target epsilon | epsilon spent |",
        "|---|---|---|---|---|",
    ]
    for client in report["clients"]:
        steps = sum(row["steps"] for row in client["history"])
        eps = "not private" if client["epsilon"] is None else f"{client['epsilon']:.3f}"
        target = client["target_epsilon"]
        lines.append(f"| {client['id']} | {len(client['history'])} | {steps} | "
                     f"{'inf' if target is None else target} | {eps} |")
    lines += ["", "Per-round history (noise multiplier, sample rate, steps):", ""]
    for client in report["clients"]:
        rows = ", ".join(f"r{row['round']}: σ={row['noise_multiplier']:.3f} q={row['sample_rate']:.4f} "
                         f"steps={row['steps']}" for row in client["history"])
        lines.append(f"- client {client['id']}: {rows or '(no private rounds)'}")
    faults = report.get("faults")
    lines += ["", f"## Faults ({'not recorded' if faults is None else len(faults)})", ""]
    if faults is None:
        lines.append("This report is from before fault logging.")
    elif faults:
        lines += ["| round | client | node | kind | reason | what the server did |", "|---|---|---|---|---|---|"]
        lines += [f"| {f['round']} | {_cell(f.get('client'))} | {_cell(f.get('node'))} | {f['kind']} | "
                  f"{_cell(f['reason'])} | {_cell(f['action'])} |" for f in faults]
    else:
        lines.append("None: every reply was valid and every sampled node answered.")
    lines += ["", f"Recompute any figure from `{REPORT_JSON}`: compose each client's history with "
              f"`opacus.accountants.create_accountant('{report['accountant']}')` at delta.", ""]
    return "\n".join(lines)


def plot_epsilon(report: dict, path: Path) -> None:
    """Cumulative epsilon per client versus round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for client in report["clients"]:
        history = [PrivacyStep.from_dict(row) for row in client["history"]]
        if history:
            curve = epsilon_curve(history, report["delta"], report["accountant"])
            ax.plot([row.round for row in history], curve, marker="o", label=f"client {client['id']}")
    targets = {c["target_epsilon"] for c in report["clients"] if c["target_epsilon"] is not None}
    for target in targets:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon (delta={report['delta']:g}, {report['accountant']})")
    ax.set_title("Privacy spent per client")
    if report["clients"]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(value) -> str:
    """A Markdown table cell: `-` for none, pipes escaped (a hostile reason must not break the table)."""
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _json_number(value: float):
    return value if math.isfinite(value) else None


def _client_order(client_id: str):
    return (0, int(client_id)) if client_id.isdigit() else (1, client_id)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory that holds privacy.json")
    args = parser.parse_args(argv)
    path = args.run_dir / REPORT_JSON
    if not path.is_file():
        raise FedloraError(f"{path} not found: give the run directory printed at the end of a run")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FedloraError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    try:
        checked = recompute(report)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FedloraError(f"{path}: not a valid privacy report ({type(err).__name__}: {err})") from None
    for before, after in zip(report["clients"], checked["clients"]):
        if before["epsilon"] is not None and after["epsilon"] is not None and \
                not math.isclose(before["epsilon"], after["epsilon"], rel_tol=1e-6):
            print(f"warning: client {before['id']}: recorded epsilon {before['epsilon']} != recomputed "
                  f"{after['epsilon']}; the report now shows the recomputed value")
    markdown = write_report(args.run_dir, checked)
    for client in checked["clients"]:
        eps = "not private" if client["epsilon"] is None else f"{client['epsilon']:.3f}"
        print(f"client {client['id']}: epsilon {eps} (target {client['target_epsilon']}, delta {checked['delta']:g})")
    print(f"report: {markdown}")


if __name__ == "__main__":
    main()
