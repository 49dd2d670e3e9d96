"""Check a Flower process's settings, then become it (exec): bad input fails in a second, clearly.

    python -m deploy.preflight [--data PATH] -- flower-supernode ... --node-config 'partition-id=0 ...'
    python -m deploy.preflight -- flower-superlink ... --ssl-certfile ... --ssl-keyfile ... --ssl-ca-certfile ...

flower-superlink: its TLS certificate is valid now, issued by its --ssl-ca-certfile, and matches its key
(`deploy.certificates`). flower-supernode: the `--node-config` (partition-id and num-partitions are integers
with 0 <= partition-id < num-partitions; ledger-dir, if set, is a writable directory, created if missing);
with `--data` (or the node config's `dataset`), that the organisation's data file exists, is readable and
parses as a labelled CSV/JSONL file (or is "wordnet" and the WordNet data is installed); its
--root-certificates CA and Runtime API certificate are valid; and, if the SuperLink already answers, that
the certificate it presents verifies against that CA (expired or from another CA: refused now, not retried
forever). On a problem: `error: ...` on stderr and exit code 2; otherwise the command replaces this process,
so signals and exit codes are Flower's own.
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


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def check_certificates(ca: str | None, cert: str | None, key: str | None) -> None:
    from deploy.certificates import CertificateProblem, check_tls_files

    if ca is None:
        return  # not a TLS deployment: nothing to check
    try:
        check_tls_files(ca, cert, key)
    except CertificateProblem as err:
        raise PreflightError(str(err)) from None


def check_superlink(command: list[str], data: str) -> None:
    check_certificates(flag(command, "--ssl-ca-certfile"), flag(command, "--ssl-certfile"),
                       flag(command, "--ssl-keyfile"))


def check_supernode(command: list[str], data: str) -> None:
    from deploy.certificates import CertificateProblem, probe_server

    node_config = node_config_of(command)
    check_node_config(node_config)
    data = data or str(node_config.get("dataset", ""))  # the organisation's own data file
    if data:
        check_data(data)
    root = flag(command, "--root-certificates")
    check_certificates(root, None, None)
    check_certificates(flag(command, "--ssl-ca-certfile"), flag(command, "--ssl-certfile"),
                       flag(command, "--ssl-keyfile"))
    superlink = flag(command, "--superlink")
    if root and superlink:
        try:
            if not probe_server(superlink, root):
                print(f"preflight: the SuperLink at {superlink} does not answer yet; flower-supernode will retry",
                      file=sys.stderr)
        except CertificateProblem as err:
            raise PreflightError(str(err)) from None


CHECKS = {"flower-superlink": check_superlink, "flower-supernode": check_supernode}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m deploy.preflight [--data PATH] -- flower-supernode|flower-superlink ...",
              file=sys.stderr)
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
        program = Path(command[0]).name
        if program not in CHECKS:
            raise PreflightError(f"preflight checks {' and '.join(CHECKS)}, not {command[0]!r}")
        CHECKS[program](command, args.data)
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
