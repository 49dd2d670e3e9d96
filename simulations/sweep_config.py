"""A sweep's TOML file: which run-config keys vary (the grid), which stay fixed, and how many clients.

    [sweep]
    num-clients = 8                    # simulated SuperNodes per cell
    delta = "auto"                     # or a number: "auto" = min(1e-5, 1 / (10 n)), n = smallest client's examples
    reference = true                   # also run centralized non-private LoRA on the pooled data, per seed
    results = "results/cpu.jsonl"      # default: results/<file stem>.jsonl beside the current directory

    [sweep.fixed]                      # run-config keys of every cell (pyproject.toml's defaults for the rest)
    num-rounds = 3

    [sweep.grid]                       # one cell per combination, in this order
    strategy = ["fedavg_lora", "ffa_lora", "fedsvd"]
    target-epsilon = [1.0, 3.0, 8.0, inf]
    partitioner = ["iid", "dirichlet"]
    seed = [0, 1, 2]

    [sweep.when.strategy.fedavg_lora]  # extra keys for the cells (references included) whose strategy is
    lr = 0.003                         # fedavg_lora: a setting tuned per strategy, not crossed with the grid

Every cell's run config is validated (`RunConfig.from_flower`, the strategy/adapter check) before the
first cell starts, so a typo costs a second, not a half-finished sweep.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from common.config import RunConfig
from common.errors import ConfigError

SWEEP_KEYS = {"num-clients", "delta", "reference", "results"}
# The centralized reference: one client holding every client's data, no DP, the same number of steps.
REFERENCE_STRATEGY = "centralized"


@dataclass(frozen=True)
class Cell:
    """One simulation of the sweep: its run-config overrides and how many clients it simulates."""

    overrides: dict
    num_clients: int
    kind: str = "federated"  # or "reference"

    @property
    def id(self) -> str:
        """Stable across runs of the sweep (resume finds finished cells by it): a hash of what defines it."""
        blob = json.dumps({"overrides": self.overrides, "num_clients": self.num_clients, "kind": self.kind},
                          sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        varying = " ".join(f"{k}={_short(v)}" for k, v in sorted(self.overrides.items())
                           if k not in ("run-dir",))
        return f"[{self.kind}] {varying}"


@dataclass(frozen=True)
class Sweep:
    path: Path
    num_clients: int
    delta: float | str
    reference: bool
    results: Path
    fixed: dict
    grid: dict[str, list] = field(default_factory=dict)
    when: dict[str, dict[str, dict]] = field(default_factory=dict)  # key -> value -> extra run-config keys

    def cells(self) -> list[Cell]:
        """The grid's cells (product of the grid's values, in file order), then the reference cells."""
        keys = list(self.grid)
        cells = [Cell({**self.fixed, **dict(zip(keys, values, strict=True))}, self.num_clients)
                 for values in itertools.product(*(self.grid[k] for k in keys))]
        if self.reference:
            seeds = self.grid.get("seed", [self.fixed.get("seed", RunConfig.seed)])
            for seed in seeds:
                cells.append(reference_cell(self, seed))
        return [self._with_when(cell) for cell in cells]

    def _with_when(self, cell: Cell) -> Cell:
        """Add the [sweep.when.KEY.VALUE] keys of every KEY = VALUE the cell has (a cell without a match keeps
        its overrides, so its id, and a finished row, stay valid)."""
        extra = {}
        for key, by_value in self.when.items():
            if key in cell.overrides:
                extra.update(by_value.get(_short(cell.overrides[key]), {}))
        if not extra:
            return cell
        return Cell({**cell.overrides, **extra}, cell.num_clients, cell.kind)


def reference_cell(sweep: Sweep, seed) -> Cell:
    """Centralized non-private LoRA on the pooled data: one client holds all of it (IID, one partition) and
    sees per step the examples all clients of a federated round see together: the same `local-steps`, at a
    batch of clients-per-round x batch-size (the large-batch twin of averaging the clients' steps; taking
    clients-per-round times as many sequential Adam steps instead diverged at the default lr)."""
    fixed = dict(sweep.fixed)
    clients_per_round = int(fixed.get("clients-per-round", min(sweep.num_clients, RunConfig.clients_per_round)))
    batch = int(fixed.get("batch-size", RunConfig.batch_size)) * clients_per_round
    for key in ("strategy", "target-epsilon", "partitioner", "clients-per-round", "batch-size", "noise-multiplier"):
        fixed.pop(key, None)
    overrides = {**fixed, "seed": seed, "strategy": "fedavg_lora", "target-epsilon": math.inf, "partitioner": "iid",
                 "clients-per-round": 1, "batch-size": batch}
    return Cell(overrides, num_clients=1, kind="reference")


def load_sweep(path: Path) -> Sweep:
    """Parse and check a sweep file; ConfigError (one line) on anything wrong."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"sweep file {path} is not valid TOML: {err}") from None
    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep file {path} needs a [sweep] table (with [sweep.grid] and [sweep.fixed])")
    grid, fixed, when = sweep.get("grid", {}), sweep.get("fixed", {}), sweep.get("when", {})
    settings = {k: v for k, v in sweep.items() if k not in ("grid", "fixed", "when")}
    unknown = sorted(set(settings) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"unknown [sweep] key(s) {', '.join(unknown)}; known: {', '.join(sorted(SWEEP_KEYS))}")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("[sweep.grid] is missing or empty: give at least one key with a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[sweep.grid] {key} must be a non-empty list, got {values!r}")
    overlap = sorted(set(grid) & set(fixed))
    if overlap:
        raise ConfigError(f"{', '.join(overlap)} is both in [sweep.grid] and [sweep.fixed]: keep it in one")
    if "run-dir" in grid or "run-dir" in fixed:
        raise ConfigError("run-dir is set by the sweep (one directory per cell under the results' runs/)")
    num_clients = settings.get("num-clients", 8)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"[sweep] num-clients = {num_clients!r} must be an integer >= 1")
    delta = settings.get("delta", "auto")
    if delta != "auto" and not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"[sweep] delta = {delta!r} must be \"auto\" or a number in (0, 1)")
    if "delta" in grid or "delta" in fixed:
        raise ConfigError("set delta in [sweep] (\"auto\" or a number), not in the grid or fixed keys")
    _check_when(when, grid, fixed)
    results = Path(settings.get("results", Path("results") / f"{Path(path).stem}.jsonl"))
    return Sweep(path=Path(path), num_clients=num_clients, delta=delta, reference=bool(settings.get("reference", False)),
                 results=results, fixed=dict(fixed), grid=dict(grid), when=when)


def with_settings(sweep: Sweep, settings: list[str]) -> Sweep:
    """`--set KEY=VALUE`: run-config keys added to (or replacing) [sweep.fixed] for every cell, e.g. the local
    model path a GPU sweep runs on. VALUE is read as TOML (8.0, true, "text"), else kept as text (a path).
    The cells' ids change with them, so their rows never mix with the file's own cells'."""
    fixed = dict(sweep.fixed)
    for setting in settings:
        key, sep, text = setting.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {setting!r}: give KEY=VALUE, e.g. --set model=/models/bert-base-uncased")
        if key in sweep.grid:
            raise ConfigError(f"--set {key}: {key} is a [sweep.grid] key of {sweep.path}; edit the grid instead")
        if key in ("run-dir", "delta"):
            raise ConfigError(f"--set {key}: set by the sweep itself (delta in the file's [sweep] table)")
        fixed[key] = _parse_value(text.strip())
    _check_when(sweep.when, sweep.grid, fixed)
    return Sweep(**{**sweep.__dict__, "fixed": fixed})


def _parse_value(text: str):
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _check_when(when, grid: dict, fixed: dict) -> None:
    """[sweep.when.KEY.VALUE] tables: KEY is a grid key, VALUE one of its values, and the extra keys are neither
    varied by the grid nor fixed (one place per setting)."""
    if not isinstance(when, dict):
        raise ConfigError("[sweep.when] must be tables [sweep.when.KEY.VALUE] of extra run-config keys")
    for key, by_value in when.items():
        if key not in grid:
            raise ConfigError(f"[sweep.when.{key}]: {key} is not a [sweep.grid] key ({', '.join(grid)})")
        if not isinstance(by_value, dict) or not all(isinstance(v, dict) for v in by_value.values()):
            raise ConfigError(f"[sweep.when.{key}] must hold tables [sweep.when.{key}.VALUE] of run-config keys")
        values = {_short(v) for v in grid[key]}
        for value, extra in by_value.items():
            if value not in values:
                raise ConfigError(f"[sweep.when.{key}.{value}]: {value} is not among {key}'s grid values "
                                  f"({', '.join(sorted(values))})")
            clash = sorted(set(extra) & (set(grid) | set(fixed) | {"run-dir", "delta"}))
            if clash:
                raise ConfigError(f"[sweep.when.{key}.{value}] sets {', '.join(clash)}, which the grid, "
                                  "[sweep.fixed] or the sweep itself already sets")


def check_cells(cells: list[Cell], defaults: dict) -> None:
    """Every cell's run config parses and its strategy fits its adapter (before anything runs)."""
    from server.strategies import check_compatible

    for cell in cells:
        config = RunConfig.from_flower({**defaults, **cell.overrides})
        check_compatible(config.strategy, config.adapter, config.client_rank_list, config.lora_init)
        if cell.kind == "federated" and config.clients_per_round > cell.num_clients:
            raise ConfigError(f"cell {cell.label()}: clients-per-round = {config.clients_per_round} exceeds "
                              f"num-clients = {cell.num_clients}")


def auto_delta(smallest_client_examples: int) -> float:
    """min(1e-5, 1/(10 n)): below 1/n by a factor of 10 for the smallest client (delta >= 1/n allows
    releasing a whole record), and no larger than the customary 1e-5."""
    return min(1e-5, 1.0 / (10 * smallest_client_examples))


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
