"""Figures and the summary table of a sweep's results file.

    python -m simulations.plot_sweep results/cpu.jsonl [--out results/cpu-figures]

Writes, from the finished ("ok") rows only:
- `accuracy_vs_epsilon.png`: final global accuracy against target epsilon, one line per strategy, one panel
  per partitioner, mean over seeds with a 95% t-interval; the centralized non-private reference as a line;
- `accuracy_vs_bytes.png`: final accuracy against the bytes the run sent (up + down, all rounds);
- `rounds.png`: global accuracy per round, one panel per target epsilon, mean over seeds;
- `summary.md`: the table (strategy x epsilon x partitioner: accuracy mean ± CI half-width, seeds, max spent
  epsilon, MB sent, intruder dimensions), plus a line per failed cell.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from common.errors import FedloraError, exit_on_user_error
from simulations.sweep import read_results

GROUP_KEYS = ("strategy", "adapter", "partitioner", "target-epsilon")


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t-interval); half-width is nan for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def setting(row: dict, key: str, defaults: dict):
    return row["overrides"].get(key, defaults.get(key))


def group_rows(rows: list[dict], defaults: dict) -> dict[tuple, list[dict]]:
    """Finished federated rows grouped by (strategy, adapter, partitioner, target epsilon): seeds pooled."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "ok" and row.get("kind") == "federated":
            groups[tuple(setting(row, k, defaults) for k in GROUP_KEYS)].append(row)
    return dict(groups)


def summary_table(rows: list[dict], defaults: dict) -> str:
    lines = ["| strategy | adapter | partitioner | target ε | accuracy (mean ± 95% CI) | seeds | max ε spent | "
             "MB sent | intruders |", "|---|---|---|---|---|---|---|---|---|"]
    groups = group_rows(rows, defaults)
    for key in sorted(groups, key=lambda k: (str(k[0]), str(k[1]), str(k[2]), _eps_order(k[3]))):
        members = groups[key]
        mean, half = mean_interval([r["accuracy"] for r in members])
        spent = [r["epsilon_max"] for r in members if r.get("epsilon_max") is not None]
        sent = sum(r["bytes_up"] + r["bytes_down"] for r in members) / len(members) / 1e6
        intruders = sum(r.get("intruders_total", 0) for r in members) / len(members)
        ci = "" if math.isnan(half) else f" ± {half:.3f}"
        spent_text = f"{max(spent):.2f}" if spent else "not private"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {_eps(key[3])} | {mean:.3f}{ci} | {len(members)} | "
                     f"{spent_text} | {sent:.1f} | {intruders:.1f} |")
    reference = [r for r in rows if r.get("status") == "ok" and r.get("kind") == "reference"]
    if reference:
        mean, half = mean_interval([r["accuracy"] for r in reference])
        ci = "" if math.isnan(half) else f" ± {half:.3f}"
        lines.append(f"\nCentralized non-private LoRA on the pooled data: accuracy {mean:.3f}{ci} "
                     f"({len(reference)} seeds).")
    failed = [r for r in rows if r.get("status") != "ok"]
    for row in failed:
        lines.append(f"\nFailed cell {row['cell']} ({row.get('overrides')}): {row.get('error')}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], defaults: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups = group_rows(rows, defaults)
    reference = [r["accuracy"] for r in rows if r.get("status") == "ok" and r.get("kind") == "reference"]
    partitioners = sorted({k[2] for k in groups})
    epsilons = sorted({k[3] for k in groups}, key=_eps_order)
    position = {eps: i for i, eps in enumerate(epsilons)}
    paths = []

    fig, axes = plt.subplots(1, max(1, len(partitioners)), figsize=(5 * max(1, len(partitioners)), 4), squeeze=False)
    for ax, partitioner in zip(axes[0], partitioners):
        for line in sorted({(k[0], k[1]) for k in groups if k[2] == partitioner}):
            keys = sorted((k for k in groups if (k[0], k[1]) == line and k[2] == partitioner),
                          key=lambda k: _eps_order(k[3]))
            stats = [mean_interval([r["accuracy"] for r in groups[k]]) for k in keys]
            ax.errorbar([position[k[3]] for k in keys], [m for m, _ in stats],
                        yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o", capsize=3,
                        label=f"{line[0]} ({line[1]})")
        if reference:
            ax.axhline(sum(reference) / len(reference), color="gray", linestyle="--", label="centralized, no DP")
        ax.set_xticks(range(len(epsilons)), [_eps(e) for e in epsilons])
        ax.set_xlabel("target epsilon")
        ax.set_ylabel("global test accuracy")
        ax.set_title(f"partitioner {partitioner}")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "accuracy_vs_epsilon.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    by_strategy = defaultdict(list)
    for key, members in groups.items():
        for r in members:
            by_strategy[key[0]].append(((r["bytes_up"] + r["bytes_down"]) / 1e6, r["accuracy"]))
    for strategy, points in sorted(by_strategy.items()):
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=strategy, s=18)
    ax.set_xlabel("MB sent (up + down, all rounds)")
    ax.set_ylabel("global test accuracy")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "accuracy_vs_bytes.png"))

    fig, axes = plt.subplots(1, max(1, len(epsilons)), figsize=(4 * max(1, len(epsilons)), 3.5), squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        for key in sorted(k for k in groups if k[3] == eps):
            members = groups[key]
            count = min(len(r["rounds"]) for r in members)
            curve = [sum(r["rounds"][i]["accuracy"] for r in members) / len(members) for i in range(count)]
            ax.plot(range(count), curve, marker=".", label=f"{key[0]} {key[2]}")
        ax.set_title(f"target epsilon {_eps(eps)}")
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy")
        ax.legend(fontsize=6)
    paths.append(_save(fig, out / "rounds.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _eps_order(value) -> float:
    return math.inf if value is None else float(value)


def _eps(value) -> str:
    return "∞" if value is None or math.isinf(float(value)) else f"{float(value):g}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from simulations.demo import default_run_config

    parser = argparse.ArgumentParser(description="Figures and summary table of a sweep's results.")
    parser.add_argument("results", type=Path, help="the sweep's JSONL results file")
    parser.add_argument("--out", type=Path, help="output directory (default: RESULTS without .jsonl + -figures)")
    args = parser.parse_args(argv)
    if not args.results.exists():
        raise FedloraError(f"results file {args.results} does not exist: run python -m simulations.sweep first")
    rows = list(read_results(args.results).values())
    if not any(r.get("status") == "ok" for r in rows):
        raise FedloraError(f"{args.results} has no finished cell yet")
    out = args.out or args.results.with_name(args.results.stem + "-figures")
    defaults = default_run_config()
    table = summary_table(rows, defaults)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table)
    for path in plot(rows, defaults, out):
        print(f"figure: {path}")
    print(f"table: {out / 'summary.md'}")
    print(table)


if __name__ == "__main__":
    main()
