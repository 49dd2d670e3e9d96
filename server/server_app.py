"""The Flower ServerApp: build the strategy from the run config, run the rounds, write the run directory.

RUN_DIR gets `metrics.json` (per-round accuracy, loss, bytes), `adapter.safetensors` (the final global
adapter and head), `clients/` (each client's last LoRA reply, where replies carry both factors),
`run_config.json`, `labels.json` (label names by class index), and the privacy report (`privacy.json`,
`.md`, `.png`). `python -m server.export RUN_DIR` turns it into a model; `python -m server.merge
RUN_DIR` merges the clients' own adapters into one.

After every round RUN_DIR/checkpoint/ is rewritten (server/checkpoint.py). A ServerApp started on a run
dir with a checkpoint of the same run config resumes after its round: the final outputs combine the
rounds before and after the restart.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import save_file

from common.adapters.lora import trained_from_start
from common.adapters.rank_resize import fit_ranks
from common.adapters.registry import init_summary
from common.bases.registry import check_base, check_base_strategy
from common.config import RunConfig
from common.data.partition import global_test_set
from common.diffora_selection import require_selection
from common.errors import FedloraError
from common.evaluation import evaluate
from common.logs import get_logger
from common.model import build_model, pick_device, resolve_model_path
from common.payload import from_record, load_state, to_record, trainable_state
from common.tensors import encode
from server.adapter_init import initial_frozen_factors
from server.bases import full_model, load_start, prepare_base, recovered
from server.aggregation import lora_layer_keys
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.report import build_report, describe_fault, write_report
from server.strategies import check_compatible, get_strategy
from server.strategies.layer_sampling import with_layer_sampling
from server.contributions import with_stored_contributions
from server.strategies.rank_growth import with_rank_growth
from server.strategies.user_dp import with_user_level_dp
from server.unlearn_federated import run_unlearning

app = ServerApp()
log = get_logger("server")


def resolve_run_dir(config: RunConfig) -> Path:
    if config.run_dir:
        return Path(config.run_dir).expanduser().resolve()
    return (Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")).resolve()


class GlobalEvaluator:
    """Accuracy of the global adapter on the server's held-out test set (`evaluate_fn` of the strategy)."""

    def __init__(self, config: RunConfig):
        test = global_test_set(config)
        self.label_names = list(test.label_names)
        self.adapted = build_model(config, num_labels=len(test.label_names))
        # LoRAM / QLoRAM: the clients train on the pruned base, the served model is the full one
        self.full = full_model(config, num_labels=len(test.label_names))
        self.start = None  # QLoRAM with EoRA: the start B0 A0, subtracted from what the full model gets
        self.data = encode(self.adapted.tokenizer, test, config.max_seq_len)
        self.batch_size = config.eval_batch_size
        self.device = pick_device()

    def initial_arrays(self) -> dict:
        return trainable_state(self.adapted.model)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = from_record(arrays)
        fit_ranks(self.adapted.model, state)  # FLoRA's stacked global changes rank every round
        load_state(self.adapted.model, state)
        loss, accuracy = evaluate(self.adapted.model, self.data, self.batch_size, self.device)
        extra = {}
        if self.full is not None:  # the pruned model's figures are kept; the run's are the recovered full model's
            extra = {"pruned-accuracy": accuracy, "pruned-loss": loss}
            full_state = recovered(state, self.adapted, self.full, self.start)
            fit_ranks(self.full.model, full_state)
            load_state(self.full.model, full_state)
            loss, accuracy = evaluate(self.full.model, self.data, self.batch_size, self.device)
        log.info("round %d: global test accuracy %.4f, loss %.4f (%d examples)", server_round, accuracy, loss,
                 len(self.data))
        return MetricRecord({"accuracy": accuracy, "loss": loss, **extra})


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, context)
    except FedloraError as err:
        log.error("%s", err)
        raise SystemExit(2) from None


def run(grid: Grid, context: Context) -> Path:
    started = time.time()
    config = RunConfig.from_flower(context.run_config)
    if config.unlearn_client:  # forget a client of the finished run in run-dir instead of training
        return run_unlearning(grid, config)
    strategy_class = get_strategy(config.strategy)
    check_compatible(config.strategy, config.adapter, config.client_rank_list, config.lora_init)
    require_selection(config)  # DiffoRA: the kept modules are chosen before the run
    check_base(config)
    check_base_strategy(config, strategy_class)
    if config.user_level:
        strategy_class = with_user_level_dp(strategy_class)
    if config.store_contributions:  # exact unlearning later (server/unlearn.py); refused for non-linear merges
        strategy_class = with_stored_contributions(strategy_class)
    if config.layer_sampling != "none":  # LISA / OwLore: each round's replies carry the sampled layers only
        strategy_class = with_layer_sampling(strategy_class)
    if config.rank_growth != "none":  # last: it grows what the strategy (and any user-level noise) aggregated
        strategy_class = with_rank_growth(strategy_class)
    run_dir = resolve_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(run_dir, config.to_flower())  # before anything in run_dir is rewritten
    (run_dir / "run_config.json").write_text(json.dumps(config.to_flower(), indent=2, default=str))
    log.info("run directory: %s", run_dir)

    evaluator = GlobalEvaluator(config)
    (run_dir / "labels.json").write_text(json.dumps(evaluator.label_names))
    strategy = strategy_class.from_config(config, str(run_dir))
    base = prepare_base(config, evaluator.adapted, strategy, fresh=checkpoint is None)
    evaluator.start = load_start(config, run_dir)
    initial, resume = starting_point(config, evaluator, grid, strategy, checkpoint)
    result = strategy.start(
        grid=grid, initial_arrays=to_record(initial), num_rounds=config.num_rounds, evaluate_fn=evaluator,
        after_round=lambda rnd, arrays, res: save_checkpoint(run_dir, rnd, from_record(arrays), strategy, res,
                                                             config.to_flower()),
        **resume)

    final = from_record(result.arrays) if result.arrays is not None else initial
    save_file(final, str(run_dir / "adapter.safetensors"))
    if not strategy.fold_global:  # FLoRA's replies are increments on that round's global, not adapters
        save_client_adapters(run_dir / "clients", strategy.client_adapters)
    rounds = _round_table(result, config.num_rounds, strategy.refusals)
    (run_dir / "metrics.json").write_text(json.dumps(
        {"strategy": config.strategy, "base": base, "rounds": rounds, "faults": strategy.faults,
         "wall_seconds": time.time() - started,
         **({"contributions": strategy.contribution_summary()} if config.store_contributions else {})}, indent=2))
    report = build_report(
        strategy.ledgers, delta=config.delta, accountant=config.accountant, target_epsilon=config.target_epsilon,
        run={"strategy": config.strategy, "rounds": config.num_rounds, "model": resolve_model_path(config.model),
             "dataset": config.dataset, "adapter": config.adapter, "rank": config.rank,
             "init": init_summary(config)},
        faults=strategy.faults, trained_rounds=strategy.trained_rounds,
        user_level=None if getattr(strategy, "account", None) is None else strategy.account.to_dict(),
    )
    markdown = write_report(run_dir, report)
    for row in rounds:
        log.info("round %d: global accuracy %.4f", row["round"], row["global-accuracy"])
    for client in report["clients"]:
        log.info("client %s: epsilon %s", client["id"], client["epsilon"])
    if "user_level" in report:
        log.info("user level: epsilon %s at delta %g over %d released rounds", report["user_level"]["epsilon"],
                 report["user_level"]["delta"], report["user_level"]["rounds_released"])
    log.info("faults: %d", len(strategy.faults))
    for fault in strategy.faults:
        log.warning("fault: %s", describe_fault(fault))
    log.info("privacy report: %s", markdown)
    return run_dir


def starting_point(config: RunConfig, evaluator: GlobalEvaluator, grid: Grid, strategy, checkpoint: Checkpoint | None
                   ) -> tuple[dict, dict]:
    """(global arrays before the first round to run, the `strategy.start` keywords that resume the run).

    Fresh: the model's initial adapter plus any data-initialized frozen factors (server/adapter_init.py).
    From a checkpoint: its arrays (which hold those frozen factors: no second init step) and strategy state.
    """
    if checkpoint is None:
        frozen = initial_frozen_factors(config, evaluator.adapted, grid, strategy)
        strategy.broadcast_keys = set(frozen)
        # LoRA-GA: B, A start at the broadcast start B0, A0 (the model is W0 at round 0)
        initial, resume = {**evaluator.initial_arrays(), **frozen, **trained_from_start(frozen)}, {}
    else:
        strategy.load_state_dict(checkpoint.strategy_state, checkpoint.strategy_arrays)
        initial, done = checkpoint.arrays, checkpoint.round
        frozen = {key: initial[key] for key in strategy.broadcast_keys}
        log.info("resuming from round %d (%s): rounds %d..%d left", done, checkpoint.path, done + 1,
                 config.num_rounds)
        if done < config.num_rounds:
            strategy.record_fault(done + 1, None, None, "server-restart",
                                  f"the ServerApp stopped after round {done} and was started again",
                                  f"resumed from the checkpoint of round {done}")
        resume = {"first_round": done + 1, "result": checkpoint.result}
    load_state(evaluator.adapted.model, frozen)
    return initial, resume


def save_client_adapters(directory: Path, adapters: dict[str, tuple[dict, float]]) -> None:
    """Each client's last accepted adapter (a DP output), for `python -m server.merge` after the run.

    Only complete LoRA adapters (both factors in the reply) are kept: a B trained against a frozen A
    is not an adapter on its own.
    """
    complete = {client: value for client, value in adapters.items()
                if lora_layer_keys(value[0])}
    if not complete:
        return
    directory.mkdir(exist_ok=True)
    for client, (arrays, examples) in complete.items():
        save_file(arrays, str(directory / f"client-{client}.safetensors"), metadata={"num-examples": str(examples)})
    log.info("last adapters of %d clients: %s (merge them with python -m server.merge)", len(complete), directory)


def _round_table(result, num_rounds: int, refusals: dict[int, list[str]]) -> list[dict]:
    """One row per round (round 0 = before training) from Flower's Result."""
    rows = []
    for rnd in range(num_rounds + 1):
        row: dict = {"round": rnd}
        server = result.evaluate_metrics_serverapp.get(rnd)
        if server is not None:
            row["global-accuracy"], row["global-loss"] = server["accuracy"], server["loss"]
            row.update({f"global-{key}": value for key, value in server.items() if key not in ("accuracy", "loss")})
        for prefix, record in (("train", result.train_metrics_clientapp.get(rnd)),
                               ("client-eval", result.evaluate_metrics_clientapp.get(rnd))):
            for key, value in (dict(record) if record is not None else {}).items():
                row[key if prefix == "train" else f"client-{key}"] = value
        if rnd in refusals:
            row["refused-clients"] = refusals[rnd]
        rows.append(row)
    return rows
