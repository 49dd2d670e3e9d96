"""Render docker-compose.yml from deploy/topology.py (the loopback test starts the same processes).

    python -m deploy.render_compose            # rewrite docker-compose.yml
    python -m deploy.render_compose --check    # exit 1 if docker-compose.yml is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from deploy.topology import (CA_CERT, DEFAULT, SERVER_CERT, SERVER_KEY, SuperNodeSpec, Topology, auth_private_key,
                             node_cert, node_key)

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
IMAGE = "fedlora:latest"
DATA_FILE = "dataset.csv"  # each organisation puts its data at /data/dataset.csv in its own data volume

HEADER = """\
# GENERATED from deploy/topology.py by `python -m deploy.render_compose` -- edit the topology, then re-render
# (tests/test_compose.py fails when this file is out of date).
#
# One SuperLink (TLS, SuperNode authentication), one SuperExec running the ServerApp, and per organisation one
# SuperNode (own node config, auth key, data + ledger volumes) with its SuperExec running the ClientApp.
# Before `docker compose up`: `python scripts/gen_certs.py` (writes deploy/certs/), put each organisation's
# data file into its data volume as /data/dataset.csv, then register the SuperNode keys and run (README).
"""


def _health(port: int, certs: str) -> dict:
    """TLS handshake (verified against our CA) + GET /health on localhost:port."""
    probe = ("import ssl,urllib.request; urllib.request.urlopen('https://localhost:%d/health', timeout=5, "
             "context=ssl.create_default_context(cafile='%s/%s'))" % (port, certs, CA_CERT))
    return {"test": ["CMD", "python", "-c", probe], "interval": "10s", "timeout": "5s", "retries": 5,
            "start_period": "20s"}


def _tls_probe(port: int, certs: str) -> dict:
    """TLS handshake only (verified against our CA) on localhost:port."""
    probe = ("import socket,ssl; ssl.create_default_context(cafile='%s/%s').wrap_socket("
             "socket.create_connection(('localhost', %d), 5), server_hostname='localhost').close()"
             % (certs, CA_CERT, port))
    return {"test": ["CMD", "python", "-c", probe], "interval": "10s", "timeout": "5s", "retries": 5,
            "start_period": "20s"}


def _cert(name: str, topology: Topology) -> str:
    return f"./{topology.certs_dir}/{name}:{topology.container_certs}/{name}:ro"


def _base(topology: Topology) -> dict:
    return {"image": IMAGE, "restart": "unless-stopped", "networks": ["fedlora"]}


def services(topology: Topology = DEFAULT) -> dict:
    certs = topology.container_certs
    link = topology.superlink_service
    out: dict[str, dict] = {}
    out[link] = {
        **_base(topology),
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "command": topology.superlink_command(certs, "0.0.0.0", topology.superlink_port,
                                              f"{topology.container_state}/state.db"),
        "ports": [f"{topology.superlink_port}:{topology.superlink_port}"],
        "volumes": [_cert(CA_CERT, topology), _cert(SERVER_CERT, topology), _cert(SERVER_KEY, topology),
                    f"superlink-state:{topology.container_state}"],
        "healthcheck": _health(topology.superlink_port, certs),
    }
    out[topology.superexec_serverapp_service] = {
        **_base(topology),
        "command": topology.superexec_args(certs, f"{link}:{topology.superlink_port}"),
        # the ServerApp's global test set is read from /data/dataset.csv; its outputs go to the runs volume
        "volumes": [_cert(CA_CERT, topology), f"server-data:{topology.container_data}:ro", "runs:/app/runs"],
        "depends_on": {link: {"condition": "service_healthy"}},
    }
    for node in topology.supernodes:
        out.update(_supernode_services(node, topology))
    return out


def _supernode_services(node: SuperNodeSpec, topology: Topology) -> dict:
    certs = topology.container_certs
    # only this organisation's credentials: the CA, its Runtime API certificate and its auth private key
    creds = [_cert(CA_CERT, topology), _cert(node_cert(node.service), topology),
             _cert(node_key(node.service), topology), _cert(auth_private_key(node.service), topology)]
    volumes = [f"{node.service}-data:{topology.container_data}", f"{node.service}-ledger:{topology.container_ledger}"]
    return {
        node.service: {
            **_base(topology),
            "command": topology.supernode_command(
                node, f"{topology.container_data}/{DATA_FILE}", certs=certs,
                superlink_address=f"{topology.superlink_service}:{topology.superlink_port}", host="0.0.0.0",
                port=topology.supernode_port, ledger_dir=topology.container_ledger),
            "volumes": creds + volumes,
            "depends_on": {topology.superlink_service: {"condition": "service_healthy"}},
            "healthcheck": _tls_probe(topology.supernode_port, certs),
        },
        node.superexec_service: {
            **_base(topology),
            # the ClientApp runs here: it reads the organisation's data and writes its privacy ledger
            "command": topology.superexec_args(certs, f"{node.service}:{topology.supernode_port}"),
            "volumes": [_cert(CA_CERT, topology), *volumes],
            "depends_on": {node.service: {"condition": "service_healthy"}},
        },
    }


def compose(topology: Topology = DEFAULT) -> dict:
    volumes = ["superlink-state", "server-data", "runs"]
    for node in topology.supernodes:
        volumes += [f"{node.service}-data", f"{node.service}-ledger"]
    # No top-level `name`: Compose v1 (Debian's docker-compose, which the tests run) rejects it; the project
    # takes the directory's name, or `docker compose -p NAME`.
    return {"services": services(topology), "networks": {"fedlora": {}},
            "volumes": {name: {} for name in volumes}}


def render(topology: Topology = DEFAULT) -> str:
    return HEADER + "\n" + yaml.safe_dump(compose(topology), sort_keys=False, width=120, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that docker-compose.yml is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = COMPOSE_FILE.read_text() if COMPOSE_FILE.exists() else ""
        if current != text:
            print(f"{COMPOSE_FILE} is out of date: run python -m deploy.render_compose", file=sys.stderr)
            return 1
        return 0
    COMPOSE_FILE.write_text(text)
    print(f"wrote {COMPOSE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
