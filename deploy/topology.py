"""The deployment topology, described once.

`docker-compose.yml` is rendered from this description (`python -m deploy.render_compose`), and
`tests/test_deploy_loopback.py` starts the same processes with the same flags on 127.0.0.1; `tests/test_compose.py`
checks that the checked-in compose file still matches. Change the topology here, then re-render.

One SuperLink (server side: Fleet, Control and Runtime APIs on one TLS port, node authentication on), one
SuperExec next to it that runs the ServerApp, and per organisation one SuperNode (its own node config, node
auth key, data and ledger volume) with its own SuperExec that runs the ClientApp (`--isolation process`, the
layout of Flower's Docker guide).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The node-config keys a SuperNode sets (read by client.client_app.identity_of).
NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "ledger-dir", "dataset")

# Files that scripts/gen_certs.py writes and the processes read (relative to the certificates directory).
CA_CERT = "ca.crt"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


def node_cert(service: str) -> str:
    return f"{service}.pem"


def node_key(service: str) -> str:
    return f"{service}.key"


def auth_private_key(service: str) -> str:
    return f"{service}_auth"


def auth_public_key(service: str) -> str:
    return f"{service}_auth.pub"


@dataclass(frozen=True)
class SuperNodeSpec:
    service: str            # compose service name (and the DNS name in its Runtime API certificate)
    partition_id: int
    num_partitions: int

    @property
    def superexec_service(self) -> str:
        return f"superexec-{self.service}"

    def node_config(self, ledger_dir: str, dataset: str) -> dict[str, object]:
        """`dataset`: this organisation's own data file; the ClientApp reads it instead of the run config's."""
        return {"partition-id": self.partition_id, "num-partitions": self.num_partitions, "ledger-dir": ledger_dir,
                "dataset": dataset}


@dataclass(frozen=True)
class Topology:
    superlink_service: str = "superlink"
    superlink_port: int = 9093            # Fleet + Control + Runtime API (HTTPS)
    supernode_port: int = 9094            # each SuperNode's Runtime API, for its SuperExec (HTTPS)
    certs_dir: str = "deploy/certs"       # on the host, written by scripts/gen_certs.py
    # inside the containers
    container_certs: str = "/app/certificates"
    container_data: str = "/data"
    container_ledger: str = "/ledger"
    container_state: str = "/state"
    supernodes: tuple[SuperNodeSpec, ...] = field(default_factory=lambda: (
        SuperNodeSpec("supernode-1", 0, 2), SuperNodeSpec("supernode-2", 1, 2)))

    @property
    def superexec_serverapp_service(self) -> str:
        return "superexec-serverapp"

    # ---- command lines (certs: the certificates directory as the process sees it) ----

    def superlink_args(self, certs: str, host: str, port: int, database: str) -> list[str]:
        return ["flower-superlink", "--isolation", "process", "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--ssl-ca-certfile", f"{certs}/{CA_CERT}", "--ssl-certfile", f"{certs}/{SERVER_CERT}",
                "--ssl-keyfile", f"{certs}/{SERVER_KEY}",
                "--host", host, "--port", str(port), "--database", database]

    def superlink_command(self, certs: str, host: str, port: int, database: str) -> list[str]:
        """The SuperLink behind deploy.preflight (checks its certificate, key and CA, then execs flower-superlink)."""
        return ["python", "-m", "deploy.preflight", "--", *self.superlink_args(certs, host, port, database)]

    def superexec_args(self, certs: str, runtime_address: str) -> list[str]:
        return ["flower-superexec", "--runtime-api-address", runtime_address,
                "--root-certificates", f"{certs}/{CA_CERT}"]

    def supernode_args(self, node: SuperNodeSpec, certs: str, superlink_address: str, host: str, port: int,
                       ledger_dir: str, dataset: str, max_wait_time: float | None = None) -> list[str]:
        args = ["flower-supernode", "--isolation", "process",
                "--superlink", superlink_address, "--root-certificates", f"{certs}/{CA_CERT}",
                "--auth-supernode-private-key", f"{certs}/{auth_private_key(node.service)}",
                "--ssl-ca-certfile", f"{certs}/{CA_CERT}",
                "--ssl-certfile", f"{certs}/{node_cert(node.service)}",
                "--ssl-keyfile", f"{certs}/{node_key(node.service)}",
                "--host", host, "--port", str(port),
                "--node-config", node_config_string(node.node_config(ledger_dir, dataset))]
        if max_wait_time is not None:
            args += ["--max-wait-time", f"{max_wait_time:g}"]
        return args

    def supernode_command(self, node: SuperNodeSpec, data: str, **kwargs) -> list[str]:
        """The SuperNode behind deploy.preflight (checks node config and data, then execs flower-supernode)."""
        return ["python", "-m", "deploy.preflight", "--data", data, "--", *self.supernode_args(node, dataset=data, **kwargs)]


def node_config_string(config: dict[str, object]) -> str:
    """`--node-config` syntax: space-separated key=value, strings TOML-quoted."""
    def value(v: object) -> str:
        return f'"{v}"' if isinstance(v, str) else str(v)
    return " ".join(f"{key}={value(v)}" for key, v in config.items())


def parse_node_config(text: str) -> dict[str, object]:
    """Inverse of node_config_string (for the static checks)."""
    out: dict[str, object] = {}
    for item in text.split():
        key, _, raw = item.partition("=")
        out[key] = raw[1:-1] if raw.startswith('"') else int(raw)
    return out


DEFAULT = Topology()
