"""The privacy report: `privacy.json` (recomputable), `privacy.md`, `privacy.html` and PNG plots.

Every epsilon here is recomputed from the recorded history (noise multiplier, sample rate, steps per
round) with Opacus' accountant; nothing a client claims about its epsilon is copied. Before anything
is written, each client's history must cover every round it is known to have trained (the ServerApp's
`trained_rounds`, and the per-round counts in `metrics.json`): a ledger missing rows would under-state
the epsilon spent.

    python -m server.report RUN_DIR     # re-check privacy.json and regenerate every other report file
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from common.errors import FedloraError, exit_on_user_error
from common.privacy import PrivacyStep, epsilon_of
from common.privacy.accounting import check_history_covers
from server.report_html import render_html
from server.report_init import init_costs, init_sentence
from server.report_plots import EPSILON_PNG, write_plots

REPORT_JSON = "privacy.json"
REPORT_MD = "privacy.md"
REPORT_HTML = "privacy.html"
REPORT_PNG = EPSILON_PNG
METRICS_JSON = "metrics.json"


def build_report(ledgers: dict[str, dict], *, delta: float, accountant: str, target_epsilon: float,
                 run: dict, faults: list[dict] | None = None,
                 trained_rounds: dict[str, Iterable[int]] | None = None, user_level: dict | None = None) -> dict:
    """The `privacy.json` document for the ledgers the clients reported and the faults the server saw
    (rows of `LoRAStrategy.faults`: round, node, client, kind, reason, action).

    `trained_rounds` (optional): the rounds the server saw each client train, kept in its entry so that
    `check_ledgers_cover` can be re-run from `privacy.json` alone; FedloraError if a ledger lacks one.
    `user_level` (optional): the server's user-level account (common/privacy/user_level.py, `to_dict()`);
    the report then states both guarantees, the user-level epsilon recomputed from its released rounds.
    """
    clients = []
    for client_id in sorted(ledgers, key=_client_order):
        history = [PrivacyStep.from_dict(row) for row in ledgers[client_id]["history"]]
        clients.append({
            "id": client_id,
            "target_epsilon": _json_number(target_epsilon),
            "epsilon": _json_number(epsilon_of(history, delta, accountant)) if history else None,
            "history": [row.to_dict() for row in history],
        })
    report = {"delta": delta, "accountant": accountant, "level": "sample", "clients": clients, "run": run,
              "faults": list(faults or [])}
    if user_level is not None:
        report["user_level"] = with_user_epsilon(user_level)
    if trained_rounds is not None:
        check_ledgers_cover(report, trained_rounds)
        for client in clients:
            client["trained_rounds"] = sorted({int(r) for r in trained_rounds.get(client["id"], ())})
    return report


def check_ledgers_cover(report: dict, trained_rounds_by_client: dict[str, Iterable[int]]) -> None:
    """FedloraError naming the client, the rounds and how many, if a private client's history lacks a round
    it trained (or a client trained with no ledger in the report at all).

    A client is private if its ledger has rows or it has a target epsilon; a client trained without DP
    (infinite target, no noise) has no rows to miss.
    """
    clients = {client["id"]: client for client in report["clients"]}
    for client_id in sorted(trained_rounds_by_client, key=lambda c: _client_order(str(c))):
        rounds = sorted({int(r) for r in trained_rounds_by_client[client_id]})
        client = clients.get(str(client_id))
        if client is None:
            if rounds:
                raise FedloraError(f"client {client_id} trained {len(rounds)} round(s) ({_rounds(rounds)}) but the "
                                   "privacy report has no ledger for it: its epsilon cannot be reported")
            continue
        if not client["history"] and client["target_epsilon"] is None:
            continue
        history = [PrivacyStep.from_dict(row) for row in client["history"]]
        try:
            check_history_covers(history, rounds, str(client_id))
        except ValueError as err:
            missing = len(set(rounds) - {row.round for row in history})
            raise FedloraError(f"{err} ({missing} of the {len(rounds)} rounds it trained have no ledger row); "
                               "the report is not written: find the client's full ledger") from None


def check_metrics_counts(report: dict, rounds: list[dict]) -> None:
    """FedloraError naming the round and the numbers if `metrics.json` counts more clients trained with DP
    in a round than the report has ledger rows for that round.

    A round counts only when its `epsilon-max` is finite (every accepted client trained with DP); the rows
    do not name the clients, so this check names the clients without a row as the candidates.
    """
    for row in rounds:
        if not isinstance(row, dict):
            continue
        trained, eps = row.get("clients-trained") or 0, row.get("epsilon-max")
        if not trained or not isinstance(eps, (int, float)) or not math.isfinite(eps):
            continue
        with_row = [c["id"] for c in report["clients"] if any(h["round"] == row["round"] for h in c["history"])]
        if len(with_row) < trained:
            without = [c["id"] for c in report["clients"] if c["id"] not in with_row]
            raise FedloraError(
                f"round {row['round']}: {trained} client(s) trained with DP ({METRICS_JSON}) but only "
                f"{len(with_row)} privacy ledger(s) have a row for it: {trained - len(with_row)} ledger row(s) "
                f"missing (clients without one: {', '.join(without) or 'none in the report'}); the report "
                "would under-state their epsilon and is not written")


def check_report_ledgers(report: dict, run_dir: Path | None = None) -> None:
    """Every ledger check the report's own data (and `run_dir/metrics.json`, if there) allows."""
    recorded = {c["id"]: c["trained_rounds"] for c in report["clients"] if "trained_rounds" in c}
    check_ledgers_cover(report, recorded)
    metrics = None if run_dir is None else run_dir / METRICS_JSON
    if metrics is not None and metrics.is_file():
        try:
            rounds = json.loads(metrics.read_text()).get("rounds", [])
        except (json.JSONDecodeError, AttributeError):
            raise FedloraError(f"{metrics}: not valid JSON with a `rounds` list; move it aside to write "
                               "the report without the per-round check") from None
        check_metrics_counts(report, rounds)


def describe_fault(fault: dict) -> str:
    """One line for a fault: `round 2, client 3 (node 17): malformed-reply: <reason> -> <action>`."""
    who = "" if fault.get("client") is None else f", client {fault['client']}"
    if fault.get("node") is not None and str(fault["node"]) != str(fault.get("client")):
        who += f" (node {fault['node']})"
    return f"round {fault['round']}{who}: {fault['kind']}: {fault['reason']} -> {fault['action']}"


def with_user_epsilon(user_level: dict) -> dict:
    """A copy of the user-level entry whose epsilon is recomputed from its released rounds (one accountant
    step per round: noise multiplier, client sampling rate q)."""
    out = json.loads(json.dumps(user_level))
    history = [PrivacyStep.from_dict(row) for row in out["history"]]
    out["epsilon"] = _json_number(epsilon_of(history, out["delta"], out["accountant"]))
    out["rounds_released"] = len(history)
    return out


def recompute(report: dict) -> dict:
    """A copy of `report` whose epsilons are recomputed from the histories."""
    out = json.loads(json.dumps(report))
    if out.get("user_level"):
        out["user_level"] = with_user_epsilon(out["user_level"])
    for client in out["clients"]:
        history = [PrivacyStep.from_dict(row) for row in client["history"]]
        client["epsilon"] = _json_number(epsilon_of(history, out["delta"], out["accountant"])) if history else None
    return out


@dataclass(frozen=True)
class ClientSummary:
    """One client's line of the report tables (None: not applicable, e.g. no target or no private round)."""

    id: str
    target: float | None
    epsilon: float | None
    remaining: float | None
    rounds: int
    steps: int
    noise: float | None
    sample_rate: float | None
    audit: dict | None


def client_summaries(report: dict) -> list[ClientSummary]:
    out = []
    for client in report["clients"]:
        history, target, eps = client["history"], client["target_epsilon"], client["epsilon"]
        last = history[-1] if history else None
        out.append(ClientSummary(
            id=str(client["id"]), target=target, epsilon=eps,
            remaining=None if target is None or eps is None else target - eps,
            rounds=len({row["round"] for row in history}),  # a round re-run after a crash has two rows
            steps=sum(row["steps"] for row in history),
            noise=None if last is None else last["noise_multiplier"],
            sample_rate=None if last is None else last["sample_rate"],
            audit=client.get("audit") or None,
        ))
    return out


def write_report(run_dir: Path, report: dict) -> Path:
    """Check the ledgers, then write privacy.json, .md, .html and the plots; return the Markdown's path.

    FedloraError (nothing written) if a ledger lacks a round its client trained (`check_report_ledgers`).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    check_report_ledgers(report, run_dir)
    summaries = client_summaries(report)
    plots = write_plots(report, run_dir)
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (run_dir / REPORT_MD).write_text(render_markdown(report, summaries, [plot.name for plot in plots]))
    (run_dir / REPORT_HTML).write_text(render_html(report, summaries, plots, REPORT_JSON))
    return run_dir / REPORT_MD


def render_markdown(report: dict, summaries: list[ClientSummary] | None = None,
                    plot_names: list[str] | None = None) -> str:
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
    ]
    lines += user_level_lines(report.get("user_level"))
    summaries = client_summaries(report) if summaries is None else summaries
    audited = any(c.audit for c in summaries)
    lines += ["| client | DP rounds | DP steps | target epsilon | epsilon spent | budget remaining | "
              "noise σ (latest) | sample rate q (latest) |" + (" audit lower bound |" if audited else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if audited else "")]
    for c in summaries:
        row = (f"| {_cell(c.id)} | {c.rounds} | {c.steps} | {'inf' if c.target is None else c.target} | "
               f"{'not private' if c.epsilon is None else f'{c.epsilon:.3f}'} | "
               f"{'-' if c.remaining is None else f'{c.remaining:.3f}'} | "
               f"{'-' if c.noise is None else f'{c.noise:.3f}'} | "
               f"{'-' if c.sample_rate is None else f'{c.sample_rate:.4f}'} |")
        if audited:
            row += (" not audited |" if not c.audit else f" {c.audit['epsilon_lower_bound']:.3f} "
                    f"({c.audit['confidence']:.0%} confidence, {c.audit['correct']}/{c.audit['guesses']} right) |")
        lines.append(row)
    lines += ["", "Per-round history (noise multiplier, sample rate, steps):", ""]
    for client in report["clients"]:
        rows = ", ".join(f"r{row['round']}: σ={row['noise_multiplier']:.3f} q={row['sample_rate']:.4f} "
                         f"steps={row['steps']}" for row in client["history"])
        lines.append(f"- client {_cell(client['id'])}: {rows or '(no private rounds)'}")
    lines += init_lines(report)
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
    if plot_names:
        lines += ["", "## Plots", ""] + [line for name in plot_names for line in (f"![{name}]({name})", "")][:-1]
    lines += ["", f"Recompute any figure from `{REPORT_JSON}`: compose each client's history with "
              f"`opacus.accountants.create_accountant('{report['accountant']}')` at delta, or run "
              "`python -m server.report RUN_DIR`. The same report as one page: `privacy.html`.", ""]
    return "\n".join(lines)


def init_lines(report: dict) -> list[str]:
    """The adapter init's own section: one row per party with what the init step cost (none without an init)."""
    costs = init_costs(report)
    if costs is None:
        return []
    name, data, rows = costs
    lines = ["", "## Adapter init (round 0)", "", init_sentence(f"`{_cell(name)}`", data), "",
             "| init | party | DP steps | noise σ | sample rate q | epsilon of the init step |", "|---|---|---|---|---|---|"]
    for row in rows:
        cost = f"{row.epsilon:.3f}" if row.epsilon is not None else f"0 ({row.note})" if data != "private" else row.note
        lines.append(f"| {_cell(name)} | {_cell(row.who)} | {'-' if row.steps is None else row.steps} | "
                     f"{'-' if row.noise is None else f'{row.noise:.3f}'} | "
                     f"{'-' if row.sample_rate is None else f'{row.sample_rate:.4f}'} | {_cell(cost)} |")
    return lines


def user_level_lines(user: dict | None) -> list[str]:
    """The Markdown lines of the user-level guarantee (none without user-level DP)."""
    if not user:
        return []
    eps = "unbounded" if user["epsilon"] is None else f"{user['epsilon']:.3f}"
    target = "none" if user["target_epsilon"] is None else f"{user['target_epsilon']:g}"
    return [
        "## User-level guarantee (the server)",
        "",
        f"- **User-level epsilon {eps}** at delta = {user['delta']:g} (target {target}): protects each client's "
        "whole contribution (all of its data) in the sequence of global adapters.",
        f"- Mechanism: each of {user['population']} clients sampled with probability q = "
        f"{user['sample_rate']:.4g} per round (Poisson), each update clipped to C_u = {user['clip_norm']:g}, "
        f"Gaussian noise σ_u = {user['noise_multiplier']:.4g} (std σ_u·C_u) on the sum, divided by "
        f"{user['denominator']}; {user['rounds_released']} rounds released, accountant `{user['accountant']}`.",
        "- Not covered: the per-round client statistics in metrics.json (losses, counts, bytes).",
        "",
        "## Sample-level guarantee (each client)",
        "",
    ]


def check_report_shape(report: dict) -> None:
    """ValueError (or KeyError) unless the fields the renderers read have the documented types; the
    histories are checked by `recompute`."""
    if not isinstance(report.get("clients"), list) or not isinstance(report.get("run", {}), dict):
        raise ValueError("`clients` must be a list and `run` an object")
    init = report.get("run", {}).get("init")
    if init is not None and not (isinstance(init, dict) and {"name", "data"} <= set(init)):
        raise ValueError("run.init must be null or an object with name and data")
    _number(report["delta"], "delta")
    for client in report["clients"]:
        if client["target_epsilon"] is not None:
            _number(client["target_epsilon"], f"client {client['id']}: target_epsilon")
        if "trained_rounds" in client and not all(isinstance(r, int) for r in client["trained_rounds"]):
            raise ValueError(f"client {client['id']}: trained_rounds must be a list of round numbers")
        if client.get("audit"):
            for field in ("canaries", "guesses", "correct", "epsilon_lower_bound", "confidence"):
                _number(client["audit"][field], f"client {client['id']}: audit {field}")
    user = report.get("user_level")
    if user:
        for field in ("clip_norm", "noise_multiplier", "sample_rate", "population", "denominator", "delta"):
            _number(user[field], f"user_level {field}")
        if not isinstance(user.get("history"), list):
            raise ValueError("user_level history must be a list")
    faults = report.get("faults")
    if faults is not None and not all(isinstance(f, dict) and {"round", "kind", "reason", "action"} <= set(f)
                                      for f in faults):
        raise ValueError("`faults` must be a list of objects with round, kind, reason and action")


def _number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _cell(value) -> str:
    """A Markdown table cell: `-` for none, pipes escaped (a hostile reason must not break the table)."""
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _json_number(value: float):
    return value if math.isfinite(value) else None


def _rounds(rounds: Iterable[int]) -> str:
    return ", ".join(map(str, rounds))


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
        check_report_shape(report)
        checked = recompute(report)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FedloraError(f"{path}: not a valid privacy report ({type(err).__name__}: {err})") from None
    for before, after in zip(report["clients"], checked["clients"]):
        if before["epsilon"] is not None and after["epsilon"] is not None and \
                not math.isclose(before["epsilon"], after["epsilon"], rel_tol=1e-6):
            print(f"warning: client {before['id']}: recorded epsilon {before['epsilon']} != recomputed "
                  f"{after['epsilon']}; the report now shows the recomputed value")
    markdown = write_report(args.run_dir, checked)
    if checked.get("user_level"):
        user = checked["user_level"]
        before = (report.get("user_level") or {}).get("epsilon")
        if before is not None and user["epsilon"] is not None and not math.isclose(before, user["epsilon"],
                                                                                    rel_tol=1e-6):
            print(f"warning: user-level: recorded epsilon {before} != recomputed {user['epsilon']}; the report now "
                  "shows the recomputed value")
        print(f"user level: epsilon {user['epsilon']} (delta {user['delta']:g}, {user['rounds_released']} rounds)")
    for client in checked["clients"]:
        eps = "not private" if client["epsilon"] is None else f"{client['epsilon']:.3f}"
        print(f"client {client['id']}: epsilon {eps} (target {client['target_epsilon']}, delta {checked['delta']:g})")
    print(f"report: {markdown}")


if __name__ == "__main__":
    main()
