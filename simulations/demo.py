"""The demo: a federated DP-LoRA run of 4 simulated clients with `flwr run`, then a short summary.

    python -m simulations.demo                                # defaults from pyproject.toml
    python -m simulations.demo --run-config "strategy=\"ffa_lora\" num-rounds=2" --num-clients 4

Settings are validated here first, so a bad value is one line and exit code 2, not a traceback from
inside the simulation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

from common.config import RunConfig
from common.data.partition import client_data, global_test_set
from common.diffora_selection import resolve_diffora_modules
from common.errors import ConfigError, exit_on_user_error
from common.model import resolve_model_path
from common.privacy.plan import check_privacy_plan
from simulations.flower_sim import APP_DIR, flwr_run, gpu_share, simulation_superlink


def default_run_config() -> dict:
    with open(APP_DIR / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def parse_overrides(values: list[str]) -> dict:
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(values) if values else {}
    except Exception as err:  # flwr raises bare ValueError / TOML errors for malformed pairs
        raise ConfigError(f"cannot parse --run-config {' '.join(values)!r}: {err}") from None


def validate(config: RunConfig, num_clients: int) -> None:
    """Everything a user can get wrong, checked before any process starts."""
    from server.strategies import check_compatible

    check_compatible(config.strategy, config.adapter, config.client_rank_list, config.lora_init)
    if config.clients_per_round > num_clients:
        raise ConfigError(f"clients-per-round = {config.clients_per_round} exceeds --num-clients {num_clients}")
    model = config.model
    if model and (model.startswith((".", "/", "~")) and not Path(model).expanduser().exists()):
        raise ConfigError(f"model path {model!r} does not exist")
    resolve_model_path(model)
    global_test_set(config)
    for partition_id in range(num_clients):
        check_privacy_plan(config, len(client_data(config, partition_id, num_clients).train))
    if config.user_level:
        from common.privacy.user_level import plan_user_account
        from server.strategies import get_strategy
        from server.strategies.user_dp import with_user_level_dp

        with_user_level_dp(get_strategy(config.strategy))
        plan_user_account(config, num_clients)


def summarize(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    lines = [f"fedlora demo summary ({metrics['strategy']}, {privacy['accountant']} accountant, "
             f"delta={privacy['delta']:g})", "  round  global-acc  global-loss  train-loss  clients  client-acc"]
    for row in metrics["rounds"]:  # client-acc: the clients' own evaluation (fedsa_lora: with their own B)
        lines.append(f"  {row['round']:>5}  {row.get('global-accuracy', float('nan')):>10.4f}  "
                     f"{row.get('global-loss', float('nan')):>11.4f}  {row.get('train-loss', float('nan')):>10.4f}  "
                     f"{row.get('clients-trained', '-'):>7}  {row.get('client-eval-accuracy', float('nan')):>10.4f}")
    for client in privacy["clients"]:
        eps = "not private" if client["epsilon"] is None else f"{client['epsilon']:.3f}"
        lines.append(f"  client {client['id']}: epsilon {eps} of target {client['target_epsilon']}, "
                     f"{len(client['history'])} rounds")
    user = privacy.get("user_level")
    if user:
        eps = "unbounded" if user["epsilon"] is None else f"{user['epsilon']:.3f}"
        lines.append(f"  user level (server): epsilon {eps} at delta {user['delta']:g}, {user['rounds_released']} "
                     f"rounds at client sampling q = {user['sample_rate']:.3g}, noise {user['noise_multiplier']:.3g}")
    lines.append(f"  privacy report: {run_dir / 'privacy.html'} "
                 "(also privacy.md, privacy.json and the privacy_*.png plots)")
    lines.append(f"  export the model: python -m server.export {run_dir} [--peft]")
    lines.append(f"  wall time of the federated run: {metrics['wall_seconds']:.0f} s")
    return "\n".join(lines)


def unlearning_demo(config: RunConfig, overrides: dict, num_clients: int) -> int:
    """`unlearn-client` on a finished run dir: the same simulation, asked to forget that client."""
    from common.config import finished_run_config
    from server.unlearn_federated import unlearning_config

    run_dir = Path(config.run_dir).expanduser().resolve()
    finished = finished_run_config(run_dir, "adapter.safetensors")
    unlearning_config(finished, config).validate()
    overrides["run-dir"] = str(run_dir)
    record = run_dir / "unlearn" / f"client-{config.unlearn_client}" / "record.json"
    started = time.time()
    print(f"fedlora: asking the {num_clients} simulated clients of {run_dir} to forget client "
          f"{config.unlearn_client} (route {config.unlearn_route})", flush=True)
    with simulation_superlink() as env:
        code = flwr_run(env, overrides, num_supernodes=num_clients, gpus_per_client=gpu_share(num_clients))
    if code != 0 or not record.is_file() or record.stat().st_mtime < started:
        print(f"error: the unlearning run did not finish (flwr exit code {code}); see the log above", file=sys.stderr)
        return 1
    result = json.loads(record.read_text())
    print(f"fedlora: client {result['client']}: route {result['route']} "
          f"({'exact' if result['exact'] else 'approximate'}); {result['note']}")
    if "global-accuracy" in result:
        print(f"  unlearned global: test accuracy {result['global-accuracy']:.4f}, loss {result['global-loss']:.4f}")
    for client, ledger in sorted(result.get("ledgers", {}).items()):
        print(f"  client {client}: {len(ledger.get('history', []))} ledger rows after unlearning")
    print(f"  written: {record.parent}; measure it: python -m simulations.unlearning {run_dir} --client "
          f"{result['client']} --num-clients {num_clients}")
    print(f"  total wall time: {time.time() - started:.0f} s")
    return 0


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the fedlora demo simulation with flwr run.")
    parser.add_argument("--run-config", action="append", default=[],
                        help='overrides, e.g. "num-rounds=2 strategy=\\"ffa_lora\\"" (as for flwr run)')
    parser.add_argument("--num-clients", type=int, default=4, help="simulated SuperNodes (default 4)")
    args = parser.parse_args(argv)
    if args.num_clients < 1:
        raise ConfigError("--num-clients must be >= 1")

    overrides = parse_overrides(args.run_config)
    merged = {**default_run_config(), **overrides}
    if not merged.get("run-dir"):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        merged["run-dir"] = overrides["run-dir"] = str(APP_DIR / "runs" / f"demo-{stamp}")
    config = RunConfig.from_flower(merged)
    if config.unlearn_client:  # an unlearning run on a finished run dir (server/unlearn_federated.py)
        return unlearning_demo(config, overrides, args.num_clients)
    print(f"fedlora: checking settings and data for {args.num_clients} clients ...", flush=True)
    validate(config, args.num_clients)
    # DiffoRA with diffora-modules = "": its selection on the public split, before round 1, for every party
    config, overrides = resolve_diffora_modules(config, overrides)

    started = time.time()
    run_dir = Path(config.run_dir).expanduser().resolve()
    overrides["run-dir"] = str(run_dir)
    print(f"fedlora: starting a simulation SuperLink and `flwr run` (run directory {run_dir})", flush=True)
    with simulation_superlink() as env:
        code = flwr_run(env, overrides, num_supernodes=args.num_clients,
                        gpus_per_client=gpu_share(args.num_clients))
    if code != 0 or not (run_dir / "privacy.json").exists():
        print(f"error: the federated run did not finish (flwr exit code {code}); see the log above",
              file=sys.stderr)
        return 1
    print(summarize(run_dir))
    print(f"  total wall time (start-up, run, shut-down): {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
