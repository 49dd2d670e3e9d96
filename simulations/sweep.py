"""Run a grid of federated simulations and write one result row per cell; rerun to resume.

    python -m simulations.sweep simulations/sweeps/cpu.toml [--dry-run] [--cell-timeout 3600]
    python -m simulations.sweep simulations/sweeps/cpu.toml --set model=/models/bert-base-uncased \
        --results results/gpu-bert-base.jsonl            # the same grid on another model (the GPU sweep)
    python -m simulations.plot_sweep results/cpu.jsonl          # figures and the summary table

The grid file is described in `simulations/sweep_config.py`. Each cell is a real `flwr run` simulation
(the demo's machinery) in its own run directory, RESULTS_DIR/runs/<cell id>/. Its row in the JSONL results
file holds the cell's run config, status, final and per-round global accuracy and loss, every client's
epsilon (recomputed from its ledger by the ServerApp), bytes up/down per round, wall time, peak memory of
the cell's processes, and the intruder dimensions of the final global model.

Resume: a cell whose latest row says "ok" is never run again; a "failed" row (a nonzero exit, a timeout,
a missing report) is kept in the file and the cell runs again on the next invocation, so no failure is
dropped and no finished work is redone. Rows are appended and fsync'ed one at a time, and each cell's
ServerApp checkpoints every round in its run directory: a sweep killed at any moment loses at most the
round it was running (the cell resumes from its checkpoint; a cell whose run had finished is only
collected again).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from common.config import RunConfig
from common.errors import ConfigError, exit_on_user_error
from simulations.sweep_config import Cell, Sweep, auto_delta, check_cells, load_sweep, with_settings

RunCell = Callable[[Cell, dict, Path], dict]


def read_results(path: Path) -> dict[str, dict]:
    """The latest row of each cell id in a results file (a damaged last line, e.g. from a kill, is skipped)."""
    latest: dict[str, dict] = {}
    if not path.exists():
        return latest
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"sweep: note: {path}:{number} is not a complete JSON row (ignored; its cell runs again)")
            continue
        if isinstance(row, dict) and "cell" in row:
            latest[row["cell"]] = row
    return latest


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(row, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_sweep(sweep: Sweep, run_cell: RunCell, defaults: dict, log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell not yet finished; return the rows written this time."""
    cells = sweep.cells()
    done = {cid for cid, row in read_results(sweep.results).items() if row.get("status") == "ok"}
    todo = [cell for cell in cells if cell.id not in done]
    log(f"sweep {sweep.path}: {len(cells)} cells, {len(cells) - len(todo)} finished before, {len(todo)} to run; "
        f"results -> {sweep.results}")
    runs_dir = sweep.results.parent / "runs"
    written, durations = [], []
    for index, cell in enumerate(todo, start=1):
        log(f"sweep: cell {index}/{len(todo)} {cell.id} {cell.label()}")
        started = time.time()
        try:
            row = run_cell(cell, defaults, runs_dir)
        except Exception as err:  # a failed cell is recorded, never dropped, and the sweep goes on
            row = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=5)}
        row = {"cell": cell.id, "kind": cell.kind, "num_clients": cell.num_clients, "overrides": cell.overrides,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "wall_seconds": round(time.time() - started, 1), **row}
        append_row(sweep.results, row)
        written.append(row)
        durations.append(row["wall_seconds"])
        left = (len(todo) - index) * sum(durations) / len(durations)
        outcome = (f"accuracy {row['accuracy']:.4f}, max epsilon {_fmt(row.get('epsilon_max'))}"
                   if row["status"] == "ok" else f"FAILED: {row['error']}")
        log(f"sweep: cell {index}/{len(todo)} {row['status']} in {row['wall_seconds']:.0f} s: {outcome}; "
            f"about {left / 60:.0f} min left")
    failed = sum(row["status"] != "ok" for row in written)
    log(f"sweep: {len(written) - failed} cells ok, {failed} failed this time"
        + (" (rerun the same command to retry the failed ones)" if failed else ""))
    return written


def flower_cell(delta_setting, timeout: float) -> RunCell:
    """The real cell runner: a `flwr run` simulation on a SuperLink of its own, output to the cell's log."""

    def run(cell: Cell, defaults: dict, runs_dir: Path) -> dict:
        from common.diffora_selection import resolve_diffora_modules
        from simulations.flower_sim import flwr_run, gpu_share, simulation_superlink

        run_dir = (runs_dir / cell.id).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = {**cell.overrides, "run-dir": str(run_dir)}
        config = RunConfig.from_flower({**defaults, **overrides})
        overrides["delta"] = cell_delta(config, cell, delta_setting)
        config, overrides = resolve_diffora_modules(config, overrides)  # DiffoRA: its selection, before round 1
        log_path = run_dir / "flwr.log"
        with PeakMemory() as memory, log_path.open("w") as log_file, simulation_superlink() as env:
            code = flwr_run(env, overrides, num_supernodes=cell.num_clients,
                            gpus_per_client=gpu_share(cell.num_clients), stdout=log_file, timeout=timeout)
        if code != 0 or not (run_dir / "privacy.json").exists():
            reason = "timed out" if code is None else f"flwr exit code {code}"
            raise RuntimeError(f"{reason}, no privacy report; see {log_path}")
        return {"status": "ok", **collect(run_dir), "peak_rss_mib": memory.peak_mib, "log": str(log_path)}

    return run


def cell_delta(config: RunConfig, cell: Cell, setting) -> float:
    """The cell's delta: the sweep's number, or "auto" from its smallest client's training examples."""
    if setting != "auto":
        return float(setting)
    from common.data.partition import client_data

    smallest = min(len(client_data(config, pid, cell.num_clients).train) for pid in range(cell.num_clients))
    return auto_delta(smallest)


def collect(run_dir: Path) -> dict:
    """A finished run directory as a result row: accuracy, epsilons, bytes, intruder dimensions."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    rounds = [{"round": r["round"], "accuracy": r.get("global-accuracy"), "loss": r.get("global-loss"),
               "bytes_up": r.get("bytes-up", 0), "bytes_down": r.get("bytes-down", 0),
               "clients": r.get("clients-trained")} for r in metrics["rounds"]]
    epsilons = {c["id"]: c["epsilon"] for c in privacy["clients"]}
    finite = [e for e in epsilons.values() if e is not None]
    intruders = run_intruders(run_dir)
    return {
        "accuracy": rounds[-1]["accuracy"], "loss": rounds[-1]["loss"], "rounds": rounds,
        "epsilon": epsilons, "epsilon_max": max(finite) if finite else None, "delta": privacy["delta"],
        "accountant": privacy["accountant"],
        "bytes_up": sum(r["bytes_up"] or 0 for r in rounds), "bytes_down": sum(r["bytes_down"] or 0 for r in rounds),
        "intruders_total": sum(intruders.values()), "intruders_by_layer": intruders,
        "faults": len(privacy.get("faults", [])), "run_seconds": metrics.get("wall_seconds"),
    }


def run_intruders(run_dir: Path) -> dict[str, int]:
    """In a fresh process (`python -m common.intruders`): a sweep runs for hours while the code may change,
    and a run written by newer code (new run-config keys) must be read by that code, not this process's."""
    done = subprocess.run([sys.executable, "-m", "common.intruders", str(run_dir)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"intruder count of {run_dir} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


class PeakMemory:
    """Peak total resident memory of this process's descendants (the SuperLink, Flower's simulation, the
    ClientApps), sampled every 0.5 s; psutil, which Ray already brings."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_bytes = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak_mib(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _fmt(value) -> str:
    return "not private" if value is None else f"{value:.3f}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from simulations.demo import default_run_config, validate

    parser = argparse.ArgumentParser(description="Run (or resume) a sweep of federated simulations.")
    parser.add_argument("sweep", type=Path, help="the sweep's TOML file (see simulations/sweep_config.py)")
    parser.add_argument("--results", type=Path, help="results file (default: the sweep file's `results`)")
    parser.add_argument("--dry-run", action="store_true", help="check every cell and list them; run nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config key for every cell, on top of the file's [sweep.fixed] (repeatable), "
                             "e.g. --set model=/models/bert-base-uncased for the GPU sweep")
    parser.add_argument("--cell-timeout", type=float, default=3600.0,
                        help="seconds one cell may run before it is stopped and recorded as failed")
    args = parser.parse_args(argv)
    if args.cell_timeout <= 0:
        raise ConfigError("--cell-timeout must be > 0 seconds")
    sweep = with_settings(load_sweep(args.sweep), args.set)
    if args.results:
        sweep = Sweep(**{**sweep.__dict__, "results": args.results})
    defaults = default_run_config()
    cells = sweep.cells()
    check_cells(cells, defaults)
    checked = set()
    for cell in cells:  # data and privacy plans, once per distinct data/privacy setting
        config = RunConfig.from_flower({**defaults, **cell.overrides})
        config = RunConfig.from_flower({**config.to_flower(), "delta": cell_delta(config, cell, sweep.delta)})
        key = json.dumps({k: v for k, v in config.to_flower().items() if k not in ("strategy", "adapter")},
                         sort_keys=True, default=str) + str(cell.num_clients)
        if key not in checked:
            checked.add(key)
            validate(config, cell.num_clients)
    if args.dry_run:
        finished = read_results(sweep.results)
        for cell in cells:
            status = finished.get(cell.id, {}).get("status", "to run")
            print(f"{cell.id}  {status:>7}  {cell.label()}")
        print(f"{len(cells)} cells ({sum(finished.get(c.id, {}).get('status') == 'ok' for c in cells)} finished)")
        return 0
    # SIGTERM (a `kill`, a scheduler's time limit) unwinds like Ctrl-C, so the cell's SuperLink is stopped;
    # the cell it interrupts has no row yet and runs again (from its checkpoint) on the next invocation.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows = run_sweep(sweep, flower_cell(sweep.delta, args.cell_timeout), defaults)
    return 1 if any(row["status"] != "ok" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
