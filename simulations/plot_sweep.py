"""Figures and the summary table of a sweep's results file.

    python -m simulations.plot_sweep results/cpu.jsonl [--out results/cpu-figures]

Writes, from the finished ("ok") rows only:
- `accuracy_vs_epsilon.png`: final global accuracy against target epsilon, one line per strategy, one panel
  per partitioner, mean over seeds with a 95% t-interval; the centralized non-private reference as a line;
- `accuracy_vs_bytes.png`: final accuracy against the bytes the run sent (up + down, all rounds);
- `rounds.png`: global accuracy per round, one panel per target epsilon, mean over seeds;
- `summary.md`: the table (strategy x epsilon x partitioner: accuracy mean ± CI half-width, seeds, max spent
  epsilon, MB sent, intruder dimensions), plus a line per failed cell.

Only seeds are pooled: rows that differ in any other setting (an `lr` given to one strategy, an older run of
the same grid at other settings still in the file) are separate groups, labelled with the settings that tell
them apart, e.g. `fedavg_lora (lr 0.003)`. `--sweep FILE.toml` keeps only that sweep file's cells.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import defaultdict
from pathlib import Path

from common.errors import FedloraError, exit_on_user_error
from simulations.sweep import read_results
from simulations.sweep_config import Sweep, load_sweep

GROUP_KEYS = ("strategy", "adapter", "partitioner", "target-epsilon")
POOLED_KEYS = ("seed", "run-dir")  # what may differ within a group: the rest of a row's settings defines it


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


def group_rows(rows: list[dict], defaults: dict, kind: str = "federated") -> dict[tuple, list[dict]]:
    """Finished rows of one kind grouped by all their settings but the seed: ((key, value), ...) -> rows."""
    finished = [r for r in rows if r.get("status") == "ok" and r.get("kind") == kind]
    keys = sorted({k for r in finished for k in r["overrides"]} - set(POOLED_KEYS) | set(GROUP_KEYS))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in finished:
        groups[tuple((k, _hashable(setting(row, k, defaults))) for k in keys)].append(row)
    return dict(groups)


def telling_settings(groups: dict[tuple, list[dict]]) -> list[str]:
    """The settings outside GROUP_KEYS whose value differs between groups: what a label must show."""
    keys = {k for group in groups for k, _ in group} - set(GROUP_KEYS)
    return sorted(k for k in keys if len({dict(group)[k] for group in groups}) > 1)


def label(group: tuple, telling: list[str], name: str | None = None) -> str:
    """`fedavg_lora (lr 0.003)`: a name (the strategy by default) and the settings that tell groups apart."""
    values = dict(group)
    name = values["strategy"] if name is None else name
    extra = ", ".join(f"{k} {_value(values[k])}" for k in telling)
    return f"{name} ({extra})" if extra else name


def by_label(groups: dict[tuple, list[dict]], telling: list[str]) -> list[tuple[tuple, list[dict]]]:
    """(key, rows) pairs in the order of the settings that tell them apart (the references' order)."""
    return sorted(groups.items(), key=lambda item: label(item[0], telling, ""))


def cells_of(rows: list[dict], sweep: Sweep) -> list[dict]:
    """The rows of a sweep file's cells (by cell id), in the file's order; rows of other cells are dropped."""
    ids = [cell.id for cell in sweep.cells()]
    by_id = {r["cell"]: r for r in rows}
    return [by_id[i] for i in ids if i in by_id]


def value_of(group: tuple, key: str):
    return dict(group)[key]


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _value(value) -> str:
    """A setting as a label shows it; an empty string (e.g. `client-ranks`' default) as `""`, not as nothing."""
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else '""'


def summary_table(rows: list[dict], defaults: dict) -> str:
    lines = ["| strategy | adapter | partitioner | target ε | accuracy (mean ± 95% CI) | seeds | max ε spent | "
             "MB sent | intruders |", "|---|---|---|---|---|---|---|---|---|"]
    groups = group_rows(rows, defaults)
    telling = telling_settings(groups)
    for key in sorted(groups, key=lambda k: (label(k, telling), str(value_of(k, "adapter")),
                                             str(value_of(k, "partitioner")),
                                             _eps_order(value_of(k, "target-epsilon")))):
        members = groups[key]
        mean, half = mean_interval([r["accuracy"] for r in members])
        spent = [r["epsilon_max"] for r in members if r.get("epsilon_max") is not None]
        sent = sum(r["bytes_up"] + r["bytes_down"] for r in members) / len(members) / 1e6
        intruders = sum(r.get("intruders_total", 0) for r in members) / len(members)
        ci = "" if math.isnan(half) else f" ± {half:.3f}"
        spent_text = f"{max(spent):.2f}" if spent else "not private"
        lines.append(f"| {label(key, telling)} | {value_of(key, 'adapter')} | {value_of(key, 'partitioner')} | "
                     f"{_eps(value_of(key, 'target-epsilon'))} | {mean:.3f}{ci} | {len(members)} | "
                     f"{spent_text} | {sent:.1f} | {intruders:.1f} |")
    references = group_rows(rows, defaults, kind="reference")
    reference_telling = telling_settings(references)
    for key, members in by_label(references, reference_telling):
        mean, half = mean_interval([r["accuracy"] for r in members])
        ci = "" if math.isnan(half) else f" ± {half:.3f}"
        name = label(key, reference_telling, "Centralized non-private LoRA on the pooled data")
        lines.append(f"\n{name}: accuracy {mean:.3f}{ci} ({len(members)} seed{'s' if len(members) > 1 else ''}).")
    paired = paired_differences(groups, telling)
    if paired:
        lines += ["\nPaired by seed (the same data split, the same sampled clients' data): accuracy of one row "
                  "minus another's over the seeds both have, mean ± 95% t-interval.\n",
                  "| difference | adapter | partitioner | target ε | mean ± 95% CI | seeds | per seed |",
                  "|---|---|---|---|---|---|---|", *paired]
    failed = [r for r in rows if r.get("status") != "ok"]
    for row in failed:
        lines.append(f"\nFailed cell {row['cell']} ({row.get('overrides')}): {row.get('error')}")
    return "\n".join(lines) + "\n"


def paired_differences(groups: dict[tuple, list[dict]], telling: list[str]) -> list[str]:
    """Table lines: for two rows of one adapter, partitioner and epsilon, the mean over their shared seeds of
    the accuracy difference. A seed fixes the data split, which moves every strategy's accuracy together, so the
    paired difference is tighter than the two rows' own intervals."""
    by_context: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for key, members in groups.items():
        context = (str(value_of(key, "adapter")), str(value_of(key, "partitioner")), value_of(key, "target-epsilon"))
        by_context[context][label(key, telling)] = {r["overrides"].get("seed"): r["accuracy"] for r in members}
    lines = []
    for context in sorted(by_context, key=lambda c: (c[0], c[1], _eps_order(c[2]))):
        names = sorted(by_context[context])
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                a, b = by_context[context][first], by_context[context][second]
                seeds = sorted(set(a) & set(b), key=str)
                if len(seeds) < 2:
                    continue
                differences = [a[seed] - b[seed] for seed in seeds]
                mean, half = mean_interval(differences)
                each = ", ".join(f"{d:+.3f}" for d in differences)
                lines.append(f"| {first} − {second} | {context[0]} | {context[1]} | {_eps(context[2])} | "
                             f"{mean:+.3f} ± {half:.3f} | {len(seeds)} | {each} |")
    return lines


def plot(rows: list[dict], defaults: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups = group_rows(rows, defaults)
    telling = telling_settings(groups)
    references = group_rows(rows, defaults, kind="reference")
    reference_telling = telling_settings(references)
    partitioners = sorted({value_of(k, "partitioner") for k in groups}, key=str)
    epsilons = sorted({value_of(k, "target-epsilon") for k in groups}, key=_eps_order)
    position = {eps: i for i, eps in enumerate(epsilons)}

    def line_of(key: tuple) -> str:  # one line per strategy, adapter and telling settings
        return f"{label(key, telling)} [{value_of(key, 'adapter')}]"

    paths = []
    fig, axes = plt.subplots(1, max(1, len(partitioners)), figsize=(5 * max(1, len(partitioners)), 4), squeeze=False)
    for ax, partitioner in zip(axes[0], partitioners):
        here = [k for k in groups if value_of(k, "partitioner") == partitioner]
        for line in sorted({line_of(k) for k in here}):
            keys = sorted((k for k in here if line_of(k) == line),
                          key=lambda k: _eps_order(value_of(k, "target-epsilon")))
            stats = [mean_interval([r["accuracy"] for r in groups[k]]) for k in keys]
            ax.errorbar([position[value_of(k, "target-epsilon")] for k in keys], [m for m, _ in stats],
                        yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o", capsize=3, label=line)
        for (key, members), style in zip(by_label(references, reference_telling), itertools.cycle(["--", ":", "-."])):
            ax.axhline(sum(r["accuracy"] for r in members) / len(members), color="gray", linestyle=style,
                       label=label(key, reference_telling, "centralized, no DP"))
        ax.set_ylim(0, 1)  # an accuracy: a 2-seed t-interval can reach far past [0, 1]
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
            by_strategy[label(key, telling)].append(((r["bytes_up"] + r["bytes_down"]) / 1e6, r["accuracy"]))
    for strategy, points in sorted(by_strategy.items()):
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=strategy, s=18)
    ax.set_xlabel("MB sent (up + down, all rounds)")
    ax.set_ylabel("global test accuracy")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "accuracy_vs_bytes.png"))

    fig, axes = plt.subplots(1, max(1, len(epsilons)), figsize=(4 * max(1, len(epsilons)), 3.5), squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        for key in sorted((k for k in groups if value_of(k, "target-epsilon") == eps),
                          key=lambda k: (label(k, telling), str(value_of(k, "partitioner")))):
            members = groups[key]
            count = min(len(r["rounds"]) for r in members)
            curve = [sum(r["rounds"][i]["accuracy"] for r in members) / len(members) for i in range(count)]
            ax.plot(range(count), curve, marker=".", label=f"{label(key, telling)} {value_of(key, 'partitioner')}")
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
    parser.add_argument("--sweep", type=Path, help="keep only this sweep file's cells (others in RESULTS are left out)")
    args = parser.parse_args(argv)
    if not args.results.exists():
        raise FedloraError(f"results file {args.results} does not exist: run python -m simulations.sweep first")
    rows = list(read_results(args.results).values())
    if args.sweep is not None:
        rows = cells_of(rows, load_sweep(args.sweep))
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
