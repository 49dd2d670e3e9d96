"""The sweep runner: grid expansion, resume (finished cells never rerun, failed ones recorded and retried),
the summary statistics, and bad sweep files as one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.errors import ConfigError
from simulations.plot_sweep import mean_interval, plot, summary_table
from simulations.sweep import read_results, run_sweep
from simulations.sweep_config import auto_delta, check_cells, load_sweep, with_settings

GRID = """
[sweep]
num-clients = 3
reference = true
results = "{results}"

[sweep.fixed]
num-rounds = 2
local-steps = 4
clients-per-round = 3

[sweep.grid]
strategy = ["ffa_lora", "fedsvd"]
target-epsilon = [3.0, inf]
seed = [0, 1]
"""


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(GRID.format(results=tmp_path / "out" / "tiny.jsonl"))
    return path


def fake_row(cell, accuracy=0.5):
    eps = cell.overrides["target-epsilon"]
    return {"status": "ok", "accuracy": accuracy, "loss": 1.0, "epsilon_max": None if math.isinf(eps) else eps,
            "bytes_up": 1000, "bytes_down": 2000, "intruders_total": 3,
            "rounds": [{"round": r, "accuracy": accuracy * r / 2} for r in range(3)]}


def test_the_grid_is_the_product_in_file_order_plus_one_reference_per_seed(sweep_file):
    sweep = load_sweep(sweep_file)
    cells = sweep.cells()
    federated = [c for c in cells if c.kind == "federated"]
    assert len(federated) == 8 and len({c.id for c in cells}) == len(cells) == 10
    assert federated[0].overrides == {"num-rounds": 2, "local-steps": 4, "clients-per-round": 3,
                                      "strategy": "ffa_lora", "target-epsilon": 3.0, "seed": 0}
    assert [c.overrides["seed"] for c in federated[:2]] == [0, 1]  # the last grid key varies fastest
    references = [c for c in cells if c.kind == "reference"]
    assert [c.overrides["seed"] for c in references] == [0, 1]
    ref = references[0]
    assert ref.num_clients == 1 and math.isinf(ref.overrides["target-epsilon"])
    assert ref.overrides["local-steps"] == 4 and ref.overrides["batch-size"] == 64 * 3  # a round's examples
    assert [c.id for c in load_sweep(sweep_file).cells()] == [c.id for c in cells]  # ids are stable


def test_when_tables_add_keys_to_matching_cells_only_and_keep_the_others_ids(sweep_file):
    before = {c.id for c in load_sweep(sweep_file).cells()}
    sweep_file.write_text(sweep_file.read_text() + "\n[sweep.when.strategy.ffa_lora]\nlr = 0.003\n")
    cells = load_sweep(sweep_file).cells()
    ffa = [c for c in cells if c.overrides.get("strategy") == "ffa_lora"]
    others = [c for c in cells if c.overrides.get("strategy") != "ffa_lora"]
    assert len(ffa) == 4 and all(c.overrides["lr"] == 0.003 for c in ffa)
    assert all("lr" not in c.overrides for c in others)
    assert {c.id for c in others} <= before and not ({c.id for c in ffa} & before)


@pytest.mark.parametrize("extra, message", [
    ("[sweep.when.adapter.lora]\nlr = 1\n", "adapter is not a [sweep.grid] key"),
    ("[sweep.when.strategy.fedavg]\nlr = 1\n", "fedavg is not among strategy's grid values"),
    ("[sweep.when.strategy.fedsvd]\nseed = 1\n", "sets seed, which the grid"),
    ("[sweep.when.strategy]\nfedsvd = 1\n", "must hold tables"),
])
def test_bad_when_tables_are_one_line_errors(sweep_file, extra, message):
    sweep_file.write_text(sweep_file.read_text() + "\n" + extra)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_sweep(sweep_file)


def test_set_adds_a_key_to_every_cell_and_gives_them_new_ids(sweep_file):
    """`--set model=PATH` runs the file's grid on another model: every cell carries it, none keeps its id."""
    plain = load_sweep(sweep_file).cells()
    sweep = with_settings(load_sweep(sweep_file), ["model=/models/bert-base-uncased", "num-rounds=5", "lr=1e-3"])
    cells = sweep.cells()
    assert len(cells) == len(plain)
    assert all(c.overrides["model"] == "/models/bert-base-uncased" for c in cells)  # a path stays text
    assert all(c.overrides["num-rounds"] == 5 and c.overrides["lr"] == 0.001 for c in cells)  # TOML values
    assert not {c.id for c in cells} & {c.id for c in plain}
    assert [c.id for c in with_settings(load_sweep(sweep_file), []).cells()] == [c.id for c in plain]


@pytest.mark.parametrize("setting, message", [
    ("seed=3", "seed is a \\[sweep.grid\\] key"),
    ("model", "give KEY=VALUE"),
    ("delta=1e-6", "set by the sweep itself"),
])
def test_bad_set_options_are_one_line_errors(sweep_file, setting, message):
    with pytest.raises(ConfigError, match=message):
        with_settings(load_sweep(sweep_file), [setting])


def test_set_may_not_clash_with_a_when_table(sweep_file):
    sweep_file.write_text(sweep_file.read_text() + "\n[sweep.when.strategy.ffa_lora]\nlr = 0.003\n")
    with pytest.raises(ConfigError, match="already sets"):
        with_settings(load_sweep(sweep_file), ["lr=0.01"])


def test_resume_skips_finished_cells_and_retries_failed_ones(sweep_file):
    sweep = load_sweep(sweep_file)
    cells = sweep.cells()
    broken = cells[3].id
    calls, attempts = [], []

    def run_cell(cell, defaults, runs_dir):
        calls.append(cell.id)
        attempts.append(cell.id)
        if cell.id == broken and attempts.count(broken) == 1:
            raise RuntimeError("flwr exit code 1, no privacy report")
        return fake_row(cell)

    logs = []
    first = run_sweep(sweep, run_cell, {}, log=logs.append)
    assert len(first) == len(cells) and calls == [c.id for c in cells]
    latest = read_results(sweep.results)
    assert latest[broken]["status"] == "failed" and "no privacy report" in latest[broken]["error"]
    assert sum(row["status"] == "ok" for row in latest.values()) == len(cells) - 1
    assert any("FAILED: RuntimeError: flwr exit code 1" in line for line in logs)
    assert "rerun the same command to retry" in logs[-1]

    calls.clear()
    second = run_sweep(sweep, run_cell, {}, log=logs.append)
    assert calls == [broken] and second[0]["status"] == "ok"
    rows = [json.loads(line) for line in sweep.results.read_text().splitlines()]
    assert [r["status"] for r in rows if r["cell"] == broken] == ["failed", "ok"]  # the failure stays on record

    calls.clear()
    assert run_sweep(sweep, run_cell, {}, log=logs.append) == [] and calls == []
    assert logs[-2].startswith(f"sweep {sweep_file}: 10 cells, 10 finished before, 0 to run")


def test_a_row_cut_off_by_a_kill_is_ignored_and_its_cell_runs_again(sweep_file):
    sweep = load_sweep(sweep_file)
    cells = sweep.cells()
    sweep.results.parent.mkdir(parents=True)
    good = {"cell": cells[0].id, "status": "ok", "accuracy": 0.4}
    sweep.results.write_text(json.dumps(good) + "\n" + json.dumps({"cell": cells[1].id, "status": "ok"})[:25])
    assert set(read_results(sweep.results)) == {cells[0].id}
    calls = []
    run_sweep(sweep, lambda cell, d, r: calls.append(cell.id) or fake_row(cell), {}, log=lambda line: None)
    assert calls == [c.id for c in cells[1:]]


@pytest.mark.parametrize("text, message", [
    ("[sweep]\n[sweep.grid]\n", "[sweep.grid] is missing or empty"),
    ("[sweep.grid]\nseed = 3\n", "seed must be a non-empty list"),
    ("[sweep]\nnum-client = 3\n[sweep.grid]\nseed=[1]\n", "unknown [sweep] key(s) num-client"),
    ("[sweep]\nnum-clients = 0\n[sweep.grid]\nseed=[1]\n", "num-clients = 0 must be an integer >= 1"),
    ("[sweep.fixed]\nseed = 1\n[sweep.grid]\nseed=[1]\n", "seed is both in [sweep.grid] and [sweep.fixed]"),
    ("[sweep]\ndelta = 2\n[sweep.grid]\nseed=[1]\n", "delta = 2 must be \"auto\" or a number in (0, 1)"),
    ("[sweep.grid]\nrun-dir = [\"x\"]\n", "run-dir is set by the sweep"),
    ("[sweep\n", "is not valid TOML"),
    ("[other]\n", "needs a [sweep] table"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_sweep(path)


def test_every_cell_is_checked_before_anything_runs(sweep_file):
    from simulations.demo import default_run_config

    sweep = load_sweep(sweep_file)
    check_cells(sweep.cells(), default_run_config())
    bad = load_sweep(sweep_file).__class__(**{**sweep.__dict__, "grid": {**sweep.grid, "strategy": ["fedavgg"]}})
    with pytest.raises(ConfigError, match="fedavgg"):
        check_cells(bad.cells(), default_run_config())
    crowded = sweep.__class__(**{**sweep.__dict__, "num_clients": 2})
    with pytest.raises(ConfigError, match="clients-per-round = 3 exceeds num-clients = 2"):
        check_cells(crowded.cells(), default_run_config())


def test_auto_delta_is_a_tenth_of_one_over_the_smallest_client_or_1e_5():
    assert auto_delta(50) == 1e-5  # 1/(10·50) = 2e-3 > 1e-5
    assert auto_delta(1_000_000) == pytest.approx(1e-7)


def test_mean_interval_is_the_t_interval():
    mean, half = mean_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))  # t_{0.975, 2} * s / sqrt(n)
    assert math.isnan(mean_interval([0.4])[1])


def test_summary_table_and_figures_from_rows(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    cells = sweep.cells()
    accuracies = iter([0.5, 0.7, 0.2, 0.3, 0.6, 0.8, 0.25, 0.35, 0.9, 0.92])
    run_sweep(sweep, lambda cell, d, r: fake_row(cell, next(accuracies)), {}, log=lambda line: None)
    rows = list(read_results(sweep.results).values())
    rows[0] = {**rows[0], "status": "failed", "error": "timed out"}
    defaults = {"adapter": "lora", "partitioner": "dirichlet"}
    table = summary_table(rows, defaults)
    mean, half = mean_interval([0.6, 0.8])
    assert f"| fedsvd | lora | dirichlet | 3 | {mean:.3f} ± {half:.3f} | 2 | 3.00 | 0.0 | 3.0 |" in table
    assert "| ffa_lora | lora | dirichlet | 3 | 0.700 | 1 |" in table  # one seed left after the failure: no CI
    assert "| fedsvd | lora | dirichlet | ∞ | 0.300 ± " in table and "not private" in table
    assert "Centralized non-private LoRA on the pooled data: accuracy 0.910" in table
    assert f"Failed cell {cells[0].id}" in table and "timed out" in table
    paths = plot(rows, defaults, tmp_path / "figures")
    assert [p.name for p in paths] == ["accuracy_vs_epsilon.png", "accuracy_vs_bytes.png", "rounds.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def result_row(cell, strategy, seed, accuracy, epsilon=3.0, kind="federated", **settings):
    """A finished results-file row as the sweep writes it, at `settings` besides strategy, epsilon and seed."""
    overrides = {"strategy": strategy, "target-epsilon": epsilon, "seed": seed, **settings}
    return {"cell": cell, "kind": kind, "status": "ok", "overrides": overrides, "accuracy": accuracy,
            "epsilon_max": epsilon, "bytes_up": 0, "bytes_down": 0, "rounds": [{"accuracy": accuracy}]}


def test_rows_at_other_settings_are_not_pooled_as_seeds_and_are_labelled_by_them():
    """An older run of the same grid at another lr (still in the results file) is its own group, not a 'seed'."""
    rows = [result_row("a", "ffa_lora", 0, 0.5), result_row("b", "ffa_lora", 1, 0.7),
            result_row("c", "ffa_lora", 0, 0.1, lr=0.3), result_row("r0", "ffa_lora", 0, 0.9, kind="reference"),
            result_row("r1", "ffa_lora", 0, 0.2, kind="reference", lr=0.3)]
    defaults = {"adapter": "lora", "partitioner": "dirichlet", "lr": 0.03}
    table = summary_table(rows, defaults)
    mean, half = mean_interval([0.5, 0.7])
    assert f"| ffa_lora (lr 0.03) | lora | dirichlet | 3 | {mean:.3f} ± {half:.3f} | 2 |" in table
    assert "| ffa_lora (lr 0.3) | lora | dirichlet | 3 | 0.100 | 1 |" in table
    assert "pooled data (lr 0.03): accuracy 0.900 (1 seed)." in table
    assert "pooled data (lr 0.3): accuracy 0.200 (1 seed)." in table
    # Only seeds differ: no settings in the label, the table as before.
    assert "| ffa_lora | lora | dirichlet | 3 |" in summary_table(rows[:2], defaults)


def test_a_setting_at_an_empty_default_is_labelled_visibly():
    """The rank-hetero sweep's homogeneous row keeps `client-ranks` at its default "": the label must say so."""
    rows = [result_row("a", "hetlora", 0, 0.3, **{"client-ranks": "4,8"}), result_row("b", "fedsvd", 0, 0.4)]
    table = summary_table(rows, {"adapter": "lora", "partitioner": "dirichlet", "client-ranks": ""})
    assert '| fedsvd (client-ranks "") | lora |' in table
    assert "| hetlora (client-ranks 4,8) | lora |" in table


def test_plot_sweep_keeps_only_the_cells_of_a_sweep_file(sweep_file, tmp_path):
    from simulations.plot_sweep import main as plot_main

    sweep = load_sweep(sweep_file)
    accuracies = iter([0.5, 0.7, 0.2, 0.3, 0.6, 0.8, 0.25, 0.35, 0.9, 0.92])
    run_sweep(sweep, lambda cell, d, r: fake_row(cell, next(accuracies)), {}, log=lambda line: None)
    stranger = {**read_results(sweep.results)[sweep.cells()[0].id], "cell": "elsewhere", "accuracy": 0.01}
    stranger["overrides"] = {**stranger["overrides"], "lr": 0.5}
    with sweep.results.open("a") as handle:
        handle.write(json.dumps(stranger) + "\n")
    plot_main([str(sweep.results), "--out", str(tmp_path / "all")])
    assert "lr 0.5" in (tmp_path / "all" / "summary.md").read_text()
    plot_main([str(sweep.results), "--out", str(tmp_path / "grid"), "--sweep", str(sweep_file)])
    table = (tmp_path / "grid" / "summary.md").read_text()
    assert "lr 0.5" not in table and "| ffa_lora | lora |" in table


def test_paired_differences_pool_the_per_seed_differences_of_shared_seeds():
    def row(strategy, seed, accuracy):
        return result_row(f"{strategy}{seed}", strategy, seed, accuracy, epsilon=8.0)

    rows = [row("fedsvd", 0, 0.30), row("fedsvd", 1, 0.50), row("fedsvd", 2, 0.40),
            row("ffa_lora", 0, 0.20), row("ffa_lora", 1, 0.45)]  # seed 2 missing: 2 shared seeds
    table = summary_table(rows, {"adapter": "lora", "partitioner": "dirichlet"})
    mean, half = mean_interval([0.30 - 0.20, 0.50 - 0.45])
    assert f"| fedsvd − ffa_lora | lora | dirichlet | 8 | {mean:+.3f} ± {half:.3f} | 2 | +0.100, +0.050 |" in table
    assert "Paired by seed" not in summary_table(rows[:3] + rows[3:4], {"adapter": "lora"})  # one shared seed
    rows += [{**rows[0], "cell": "ref", "kind": "reference", "overrides": {**rows[0]["overrides"], "lr": 0.1}}]
    rows[3]["overrides"] = {**rows[3]["overrides"], "lr": 0.3}  # ffa_lora's rows at another lr than fedsvd's
    rows[4]["overrides"] = {**rows[4]["overrides"], "lr": 0.3}
    table = summary_table(rows, {"adapter": "lora", "partitioner": "dirichlet", "lr": 0.03})
    assert f"| fedsvd (lr 0.03) − ffa_lora (lr 0.3) | lora | dirichlet | 8 | {mean:+.3f}" in table


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "simulations" / "sweeps").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_sweep_file_passes_the_pre_run_check(path):
    """The README's sweep commands must not stop at their first line: each committed file loads and every
    cell's run config parses and fits its strategy (what `--dry-run` checks)."""
    from simulations.demo import default_run_config

    sweep = load_sweep(path)
    assert sweep.cells()
    check_cells(sweep.cells(), default_run_config())
