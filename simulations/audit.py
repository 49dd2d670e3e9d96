"""The one-run privacy audit: canaries in one client's data, a normal federated run, an empirical lower bound
on that client's epsilon (Steinke, Nasr, Jagielski 2023; the math is common/privacy/audit.py).

    python -m simulations.audit --canaries 200 --num-clients 4 --run-config "num-rounds=3"
    python -m simulations.audit --score RUN_DIR       # score a finished run that was trained with canaries

The run is the demo's (`flwr run`, same settings) with `audit-canaries` and `audit-client` set: the audited
client's training split gets each of m random-word, random-label canaries with probability 1/2. Afterwards
each canary is scored by its loss drop between the initial and the final global model (the drop, not the
final loss, so a canary's own difficulty cancels), the `guesses` / 2 highest scores are guessed "in" and
the `guesses` / 2 lowest "out", and the number right becomes a lower bound on epsilon that holds with the
stated confidence for any (epsilon, delta)-DP training. The final global model is a post-processing of
everything the audited client released, so its sample-level epsilon must bound the result: a bound above
it means the accounting or the DP-SGD is wrong, and the command exits with status 1.

The bound and the counts go into the client's entry of privacy.json as `audit`, and privacy.md / .html /
the plots are regenerated (privacy_audit.png: bound versus reported epsilon).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from common.adapters.rank_resize import fit_ranks
from common.config import RunConfig, finished_run_config
from common.errors import ConfigError, FedloraError, exit_on_user_error
from common.evaluation import per_example_losses
from common.model import build_model, pick_device
from common.payload import load_state
from common.privacy.audit import AuditResult, audit, canary_scores
from common.privacy.canaries import canary_inclusion, make_canaries
from common.tensors import encode
from server.report import REPORT_JSON, write_report

DEFAULT_CANARIES = 200
DEFAULT_CONFIDENCE = 0.95


def default_guesses(canaries: int) -> int:
    """Half the canaries, split evenly between "in" and "out" (the rest abstain)."""
    return 2 * (canaries // 4)


def score_run(run_dir: Path, guesses: int | None = None, confidence: float = DEFAULT_CONFIDENCE,
              client_id: str | None = None) -> tuple[AuditResult, float | None]:
    """Score the canaries of a finished run, write the audit into its report; (result, reported epsilon)."""
    config = _run_config(run_dir)
    m = config.audit_canaries
    if m == 0:
        raise ConfigError(f"{run_dir} was trained without canaries (audit-canaries = 0): run "
                          "`python -m simulations.audit --canaries M ...` to train one")
    guesses = default_guesses(m) if guesses is None else guesses
    if not 0 < guesses <= m or guesses % 2:
        raise ConfigError(f"--guesses {guesses} must be even and in 2..{m} (the canaries)")
    report_path = run_dir / REPORT_JSON
    report = json.loads(report_path.read_text())
    client_id = str(config.audit_client) if client_id is None else client_id
    entry = next((c for c in report["clients"] if str(c["id"]) == client_id), None)
    if entry is None:
        raise FedloraError(f"{report_path} has no client {client_id!r} (the audited client): it never trained; "
                           "give its id with --client-id if its node-config sets one")
    labels = json.loads((run_dir / "labels.json").read_text())
    initial, final = canary_losses(config, run_dir, labels)
    scores = canary_scores(final, initial)
    result = audit(scores, canary_inclusion(m, config.seed), guesses // 2, guesses // 2, config.delta, confidence)
    entry["audit"] = result.to_dict()
    write_report(run_dir, report)
    return result, entry["epsilon"]


def canary_losses(config: RunConfig, run_dir: Path, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(each canary's loss under the initial global model, under the final one)."""
    adapted = build_model(config, num_labels=len(labels))
    data = encode(adapted.tokenizer, make_canaries(config.audit_canaries, labels, config.seed), config.max_seq_len)
    device = pick_device()
    initial = per_example_losses(adapted.model, data, config.eval_batch_size, device)
    final_state = load_file(str(run_dir / "adapter.safetensors"))
    fit_ranks(adapted.model, final_state)
    load_state(adapted.model, final_state)
    return initial, per_example_losses(adapted.model, data, config.eval_batch_size, device)


def _run_config(run_dir: Path) -> RunConfig:
    return finished_run_config(run_dir, "adapter.safetensors", REPORT_JSON, "labels.json")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--score", type=Path, metavar="RUN_DIR", help="only score a finished run with canaries")
    parser.add_argument("--canaries", type=int, default=DEFAULT_CANARIES, help=f"m (default {DEFAULT_CANARIES})")
    parser.add_argument("--client", type=int, default=0, help="partition id of the audited client (default 0)")
    parser.add_argument("--client-id", help="its client id in the report, if its node-config sets one")
    parser.add_argument("--guesses", type=int, help="guesses made, half in and half out (default: m / 2)")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    parser.add_argument("--num-clients", type=int, default=4, help="simulated SuperNodes (default 4)")
    parser.add_argument("--run-config", action="append", default=[], help="overrides, as for the demo")
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence {args.confidence} must be in (0, 1)")
    run_dir = args.score
    if run_dir is None:
        if args.canaries < 2:
            raise ConfigError(f"--canaries {args.canaries}: an audit needs at least 2 canaries")
        if not 0 <= args.client < args.num_clients:
            raise ConfigError(f"--client {args.client} is not a partition id 0..{args.num_clients - 1}")
        run_dir = _train(args)
        if run_dir is None:
            return 1
    result, epsilon = score_run(run_dir.resolve(), args.guesses, args.confidence, args.client_id)
    reported = "not private (no DP)" if epsilon is None else f"{epsilon:.3f}"
    print(f"audit of client {args.client_id or _run_config(run_dir).audit_client}: {result.correct} of "
          f"{result.guesses} guesses right ({result.canaries} canaries) -> epsilon >= "
          f"{result.epsilon_lower_bound:.3f} with {result.confidence:.0%} confidence; reported epsilon {reported}")
    print(f"report: {run_dir / 'privacy.html'}")
    if epsilon is not None and result.epsilon_lower_bound > epsilon:
        print("error: the audit's lower bound is above the reported epsilon: the accounting or the DP-SGD is wrong",
              file=sys.stderr)
        return 1
    return 0


def _train(args) -> Path | None:
    """The demo's federated run with the canaries in the audited client's data; its run dir (None if it failed)."""
    from simulations.demo import main as demo_main, parse_overrides

    overrides = parse_overrides(args.run_config)
    run_dir = Path(overrides.get("run-dir") or Path("runs") / datetime.now(timezone.utc).strftime(
        "audit-%Y%m%d-%H%M%S")).expanduser().resolve()
    settings = f'audit-canaries={args.canaries} audit-client={args.client} run-dir="{run_dir}"'
    print(f"fedlora audit: {args.canaries} canaries, each in client {args.client}'s data with probability 1/2",
          flush=True)
    code = demo_main(["--num-clients", str(args.num_clients), *sum((["--run-config", v] for v in args.run_config),
                                                                   []), "--run-config", settings])
    return run_dir if code == 0 else None


if __name__ == "__main__":
    sys.exit(main())
