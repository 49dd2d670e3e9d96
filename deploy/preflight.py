"""Check a SuperNode's settings, then become `flower-supernode` (exec): bad input fails in a second, clearly.

    python -m deploy.preflight [--data PATH] -- flower-supernode ... --node-config 'partition-id=0 ...'

Checks the `--node-config` of the command: partition-id and num-partitions are integers with
0 <= partition-id < num-partitions, ledger-dir (if set) is a writable directory (created if missing); and with
`--data`, that the organisation's data file exists, is readable and parses as a labelled CSV/JSONL file (or is
"wordnet" and the WordNet data is installed). On a problem: `error: ...` on stderr and exit code 2; otherwise
the command replaces this process, so signals and exit codes are flower-supernode's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploy.topology import parse_node_config


class PreflightError(Exception):
    pass


def node_config_of(command: list[str]) -> dict[str, object]:
    if "--node-config" not in command:
        raise PreflightError("the flower-supernode command has no --node-config (need partition-id, num-partitions)")
    text = command[command.index("--node-config") + 1]
    try:
        return parse_node_config(text)
    except ValueError as err:
        raise PreflightError(f"cannot parse --node-config {text!r}: {err}") from None


def check_node_config(config: dict[str, object]) -> None:
    for key in ("partition-id", "num-partitions"):
        if not isinstance(config.get(key), int):
            raise PreflightError(f"node-config {key} = {config.get(key)!r}: give an integer, e.g. {key}=0")
    pid, n = int(config["partition-id"]), int(config["num-partitions"])
    if n < 1 or not 0 <= pid < n:
        raise PreflightError(f"node-config partition-id = {pid} is outside 0..{n - 1} (num-partitions = {n})")
    ledger = config.get("ledger-dir")
    if ledger:
        path = Path(str(ledger))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PreflightError(f"node-config ledger-dir {path}: cannot create it ({err.strerror})") from None
        if not os.access(path, os.W_OK):
            raise PreflightError(f"node-config ledger-dir {path} is not writable")


def check_data(data: str) -> None:
    from common.data.files import load_labeled_file
    from common.errors import FedloraError

    if data == "wordnet":
        if not Path("/usr/share/wordnet/data.noun").exists():
            raise PreflightError("dataset wordnet: /usr/share/wordnet/data.noun is missing (install wordnet-base)")
        return
    path = Path(data).expanduser()
    if not path.is_file():
        raise PreflightError(f"data path {path} does not exist or is not a file (is the data volume mounted?)")
    try:
        load_labeled_file(path, "text", "label", "")
    except (FedloraError, OSError, ValueError) as err:
        raise PreflightError(f"data path {path}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m deploy.preflight [--data PATH] -- flower-supernode ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="deploy.preflight")
    parser.add_argument("--data", default=os.environ.get("FEDLORA_DATA", ""),
                        help="this organisation's data file (default: $FEDLORA_DATA; empty = not checked)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    try:
        if not command:
            raise PreflightError("no command after --")
        node_config = node_config_of(command)
        check_node_config(node_config)
        data = args.data or str(node_config.get("dataset", ""))  # the organisation's own data file
        if data:
            check_data(data)
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
