"""`privacy.html`: the privacy report as one self-contained page (inline CSS, plots as data URIs, no script).

Every string that comes from `privacy.json` is escaped: client ids and fault reasons are chosen by clients.
"""

from __future__ import annotations

import base64
from html import escape

from server.report_init import init_costs, init_sentence

CSS = """
body { font: 15px/1.45 "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1d232a; margin: 0; background: #f6f7f9; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 40px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #d8dde3; padding-bottom: 4px; }
p.lead { font-size: 16px; margin: 0 0 14px; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border: 1px solid #d8dde3; padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.facts th { width: 150px; }
table.facts td { overflow-wrap: anywhere; max-width: 780px; }
td.reason { overflow-wrap: anywhere; max-width: 420px; }
td.audit { text-align: right; max-width: 260px; }
.small { font-size: 12px; color: #5c6670; font-weight: normal; }
.bad { color: #b3261e; font-weight: 600; }
.muted { color: #5c6670; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 18px; }
figure { margin: 0; border: 1px solid #d8dde3; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #5c6670; margin-top: 4px; }
code { font-family: "DejaVu Sans Mono", monospace; font-size: 13px; background: #eef1f4; padding: 0 3px; }
"""


def render_html(report: dict, summaries: list, plots: list, json_name: str = "privacy.json") -> str:
    """The page for `report`, its per-client `summaries` (report.ClientSummary) and written `plots`
    (report_plots.Plot)."""
    run = report.get("run", {})
    audited = any(s.audit for s in summaries)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Privacy report: {_e(run.get('strategy', 'run'))}, {_e(run.get('rounds', '?'))} rounds</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>Privacy report</h1>",
        f'<p class="lead">{_level_sentence(report)}</p>',
        '<table class="facts">',
        _fact("Accountant", f"<code>{_e(report['accountant'])}</code> (Opacus)"),
        _fact("Delta", f'<span id="delta">{_e(_g(report["delta"]))}</span>'),
        *(_fact(label, _e(run[key])) for key, label in RUN_FIELDS if key in run),
        "</table>",
        *_user_level_section(report.get("user_level")),
        f"<h2>Clients ({len(summaries)}){': sample-level guarantee' if report.get('user_level') else ''}</h2>",
        _clients_table(summaries, audited),
        *_init_section(report),
        *_faults_section(report.get("faults")),
        "<h2>Plots</h2>",
        '<div class="plots">',
        *(_figure(plot) for plot in plots),
        "</div>",
        "<h2>Recompute</h2>",
        f"<p>Every figure here is recomputed from <code>{_e(json_name)}</code>: compose each client's history "
        f"(noise multiplier, sampling rate, steps per round) with <code>opacus.accountants.create_accountant("
        f"'{_e(report['accountant'])}')</code> at delta, or run <code>python -m server.report RUN_DIR</code>.</p>",
        "</main></body></html>",
        "",
    ]
    return "\n".join(parts)


RUN_FIELDS = (("strategy", "Strategy"), ("rounds", "Rounds"), ("model", "Model"), ("dataset", "Dataset"),
              ("adapter", "Adapter"), ("rank", "Rank"))


def _level_sentence(report: dict) -> str:
    if report.get("user_level") and not any(client["history"] for client in report["clients"]):
        return ("<strong>User-level</strong> differential privacy at the server only (each client's update "
                "clipped, Gaussian noise on the sum, clients Poisson-sampled): it protects everything a client "
                "contributes. The clients trained without DP-SGD, so there is no sample-level guarantee.")
    if report.get("user_level"):
        return ("<strong>Two guarantees.</strong> User-level differential privacy at the server (each client's "
                "update clipped, Gaussian noise on the sum, clients Poisson-sampled) protects everything a client "
                "contributes; sample-level DP-SGD on each client protects its individual records.")
    if not any(client["history"] for client in report["clients"]):
        return ("<strong>No differential privacy:</strong> no client recorded a private round (no noise, no "
                "target epsilon), so this run makes no privacy guarantee.")
    if report["level"] == "sample":
        return ("<strong>Sample-level</strong> differential privacy: DP-SGD on each client (Opacus: Poisson "
                "sampling, per-sample clipping, Gaussian noise) protects every training record of that client; "
                "the server only post-processes the clients' DP outputs.")
    return f"<strong>{_e(report['level'])}-level</strong> differential privacy."


def _user_level_section(user: dict | None) -> list[str]:
    if not user:
        return []
    eps = "unbounded" if user["epsilon"] is None else f"{user['epsilon']:.3f}"
    target = "none" if user["target_epsilon"] is None else _g(user["target_epsilon"])
    return [
        "<h2>User-level guarantee (server)</h2>",
        f'<p>User-level ε = <strong id="user-epsilon">{_e(eps)}</strong> at δ = {_e(_g(user["delta"]))} '
        f"(target {_e(target)}) protects each client's whole contribution in the global adapters.</p>",
        '<table class="facts">',
        _fact("Population", _e(user["population"])),
        _fact("Client sampling q", _e(f"{user['sample_rate']:.4g}") + " (Poisson, per round)"),
        _fact("Clip norm C_u", _e(_g(user["clip_norm"]))),
        _fact("Noise multiplier σ_u", _e(f"{user['noise_multiplier']:.4g}") + " (std σ_u·C_u on the sum)"),
        _fact("Denominator", _e(user["denominator"]) + " (fixed: uniform weights, independent of who replied)"),
        _fact("Rounds released", _e(user["rounds_released"])),
        "</table>",
        '<p class="muted">Not covered by the user-level guarantee: the per-round client statistics in '
        "metrics.json (losses, counts, bytes).</p>",
    ]


def _clients_table(summaries: list, audited: bool) -> str:
    head = ["client", "target ε", "ε spent", "budget remaining", "DP rounds", "DP steps",
            "noise σ (latest)", "sampling rate q (latest)"] + (["audit lower bound on ε"] if audited else [])
    rows = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for s in summaries:
        cells = [
            f"<td>{_e(s.id)}</td>",
            _num("∞ (none)" if s.target is None else _g(s.target)),
            _num("not private" if s.epsilon is None else f"{s.epsilon:.3f}"),
            _num("-" if s.remaining is None else f"{s.remaining:.3f}", bad=s.remaining is not None and s.remaining < 0),
            _num(s.rounds),
            _num(s.steps),
            _num("-" if s.noise is None else f"{s.noise:.3f}"),
            _num("-" if s.sample_rate is None else f"{s.sample_rate:.4f}"),
        ]
        if audited:
            cells.append(_audit_cell(s))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</tbody></table>")
    if audited:
        rows.append('<p class="muted">An audit lower bound holds with the stated confidence for any run that is '
                    "(ε, δ)-DP: a bound above the reported ε means the accounting or the DP-SGD implementation "
                    "is wrong.</p>")
    return "\n".join(rows)


def _init_section(report: dict) -> list[str]:
    """The adapter init's own table: one row per party with the init step's cost (nothing without an init)."""
    costs = init_costs(report)
    if costs is None:
        return []
    name, data, rows = costs
    out = ["<h2>Adapter init (round 0)</h2>", f"<p>{init_sentence(f'<code>{_e(name)}</code>', data)}</p>",
           '<table id="init"><thead><tr><th>init</th><th>party</th><th>DP steps</th><th>noise σ</th>'
           "<th>sampling rate q</th><th>ε of the init step</th></tr></thead><tbody>"]
    for row in rows:
        cost = f"{row.epsilon:.3f}" if row.epsilon is not None else f"0 ({row.note})" if data != "private" else row.note
        out.append(f"<tr><td><code>{_e(name)}</code></td><td>{_e(row.who)}</td>{_num(_dash(row.steps))}"
                   f"{_num('-' if row.noise is None else f'{row.noise:.3f}')}"
                   f"{_num('-' if row.sample_rate is None else f'{row.sample_rate:.4f}')}{_num(cost)}</tr>")
    out.append("</tbody></table>")
    return out


def _audit_cell(s) -> str:
    if not s.audit:
        return _num("not audited")
    bound = s.audit["epsilon_lower_bound"]
    above = s.epsilon is not None and bound > s.epsilon
    detail = (f"{s.audit['confidence']:.0%} confidence; {s.audit['correct']} of {s.audit['guesses']} guesses "
              f"right, {s.audit['canaries']} canaries")
    return (f'<td class="audit{" bad" if above else ""}">{bound:.3f}{" (above the reported ε)" if above else ""}'
            f'<br><span class="small">{_e(detail)}</span></td>')


def _faults_section(faults) -> list[str]:
    if faults is None:
        return ["<h2>Faults (not recorded)</h2>", "<p>This report is from before fault logging.</p>"]
    out = [f"<h2>Faults ({len(faults)})</h2>"]
    if not faults:
        return out + ["<p>None: every reply was valid and every sampled node answered.</p>"]
    out.append("<table><thead><tr><th>round</th><th>client</th><th>node</th><th>kind</th><th>reason</th>"
               "<th>what the server did</th></tr></thead><tbody>")
    for f in faults:
        out.append(f"<tr>{_num(f.get('round'))}<td>{_e(_dash(f.get('client')))}</td>{_num(_dash(f.get('node')))}"
                   f"<td>{_e(f.get('kind'))}</td><td class=\"reason\">{_e(f.get('reason'))}</td>"
                   f"<td>{_e(f.get('action'))}</td></tr>")
    out.append("</tbody></table>")
    return out


def _figure(plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(plot.title)}">'
            f"<figcaption>{_e(plot.title)} (<code>{_e(plot.name)}</code>)</figcaption></figure>")


def _fact(label: str, value_html: str) -> str:
    return f"<tr><th>{label}</th><td>{value_html}</td></tr>"


def _num(value, bad: bool = False) -> str:
    return f'<td class="num{" bad" if bad else ""}">{_e(value)}</td>'


def _dash(value):
    return "-" if value is None else value


def _g(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _e(value) -> str:
    return escape(str(value), quote=True)
