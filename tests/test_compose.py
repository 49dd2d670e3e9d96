"""docker-compose.yml: structurally valid, up to date with deploy/topology.py, and consistent with the loopback
topology that tests/test_deploy_loopback.py starts (same services, node-config keys, certificate files)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from deploy import render_compose
from deploy.topology import (CA_CERT, DEFAULT, NODE_CONFIG_KEYS, SERVER_CERT, SERVER_KEY, auth_private_key,
                             auth_public_key, node_cert, node_key, parse_node_config)
from tests.conftest import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICE_KEYS = {"image", "build", "command", "ports", "volumes", "healthcheck", "restart", "depends_on",
                "networks", "environment"}


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, (flag, command)
    return command[command.index(flag) + 1]


def test_compose_file_is_rendered_from_topology():
    assert (REPO / "docker-compose.yml").read_text() == render_compose.render(), \
        "docker-compose.yml is out of date: run python -m deploy.render_compose"


def test_structure():
    assert set(COMPOSE) <= {"name", "services", "networks", "volumes"}
    services = COMPOSE["services"]
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)
        assert isinstance(service["command"], list) and all(isinstance(a, str) for a in service["command"])
        assert service["restart"] in {"no", "always", "on-failure", "unless-stopped"}
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition["condition"] in {"service_started", "service_healthy"}
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in COMPOSE["volumes"], (name, volume)
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}
            compile(service["healthcheck"]["test"][-1], "healthcheck", "exec")


def test_same_topology_as_loopback():
    services = COMPOSE["services"]
    supernodes = {n: s for n, s in services.items() if "flower-supernode" in s["command"]}
    assert sorted(supernodes) == sorted(node.service for node in DEFAULT.supernodes)
    superexecs = [s for s in services.values() if s["command"][0] == "flower-superexec"]
    assert len(superexecs) == len(DEFAULT.supernodes) + 1
    assert [s for s in services.values() if "flower-superlink" in s["command"]] == [services["superlink"]]
    assert services["superlink"]["command"] == DEFAULT.superlink_command(  # behind the certificate preflight
        DEFAULT.container_certs, "0.0.0.0", DEFAULT.superlink_port, f"{DEFAULT.container_state}/state.db")
    partitions = set()
    for node in DEFAULT.supernodes:
        command = supernodes[node.service]["command"]
        config = parse_node_config(_flag(command, "--node-config"))
        assert tuple(config) == NODE_CONFIG_KEYS
        assert config["num-partitions"] == len(DEFAULT.supernodes)
        partitions.add(config["partition-id"])
        # the compose command is the loopback command with container paths
        loopback = DEFAULT.supernode_command(node, "/data/dataset.csv", certs=DEFAULT.container_certs,
                                             superlink_address=f"superlink:{DEFAULT.superlink_port}",
                                             host="0.0.0.0", port=DEFAULT.supernode_port, ledger_dir="/ledger")
        assert command == loopback
    assert partitions == set(range(len(DEFAULT.supernodes)))


def test_tls_and_node_auth_everywhere():
    services = COMPOSE["services"]
    link = services["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    certs = DEFAULT.container_certs
    assert _flag(link, "--ssl-certfile") == f"{certs}/{SERVER_CERT}"
    assert _flag(link, "--ssl-keyfile") == f"{certs}/{SERVER_KEY}"
    assert _flag(link, "--ssl-ca-certfile") == f"{certs}/{CA_CERT}"
    for name, service in services.items():
        command = service["command"]
        assert "--insecure" not in command, name
        mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if v.startswith("./")}
        for flag in ("--root-certificates", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile",
                     "--auth-supernode-private-key"):
            if flag in command:  # every certificate a process reads is mounted from deploy/certs
                path = _flag(command, flag)
                assert mounted.get(path) == f"./{DEFAULT.certs_dir}/{path.rsplit('/', 1)[1]}", (name, flag)
    for node in DEFAULT.supernodes:
        command = services[node.service]["command"]
        assert _flag(command, "--auth-supernode-private-key") == f"{certs}/{auth_private_key(node.service)}"
        assert _flag(command, "--ssl-certfile") == f"{certs}/{node_cert(node.service)}"
        # an organisation's containers see only its own credentials, data and ledger
        others = [o for o in DEFAULT.supernodes if o != node]
        for service_name in (node.service, node.superexec_service):
            text = " ".join(services[service_name]["volumes"])
            for other in others:
                assert other.service not in text, (service_name, other.service)


def test_gen_certs_writes_what_compose_mounts(tmp_path):
    from scripts.gen_certs import main

    assert main([str(tmp_path), "--nodes", ",".join(n.service for n in DEFAULT.supernodes)]) == 0
    expected = {CA_CERT, SERVER_CERT, SERVER_KEY}
    for node in DEFAULT.supernodes:
        expected |= {node_cert(node.service), node_key(node.service), auth_private_key(node.service),
                     auth_public_key(node.service)}
    assert expected <= {p.name for p in tmp_path.iterdir()}
    for service in COMPOSE["services"].values():
        for volume in service["volumes"]:
            if volume.startswith(f"./{DEFAULT.certs_dir}/"):
                assert (tmp_path / volume.split(":")[0].rsplit("/", 1)[1]).exists(), volume


def test_server_certificate_names(tmp_path):
    import ipaddress

    from cryptography import x509

    from scripts.gen_certs import generate

    generate(tmp_path, ["supernode-1"], "superlink")
    cert = x509.load_pem_x509_certificate((tmp_path / SERVER_CERT).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    ca = x509.load_pem_x509_certificate((tmp_path / CA_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert oct((tmp_path / SERVER_KEY).stat().st_mode & 0o777) == "0o600"


def test_certs_dir_is_gitignored():
    assert "certs/" in (REPO / "deploy" / ".gitignore").read_text().split()
    if shutil.which("git") and (REPO / ".git").exists():
        result = subprocess.run(["git", "check-ignore", "-q", "deploy/certs/ca.crt"], cwd=REPO)
        assert result.returncode == 0


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_it():
    result = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_preflight_rejects_bad_node_settings(tmp_path, capsys):
    from deploy.preflight import main

    ok = ["--", "flower-supernode", "--node-config", f'partition-id=0 num-partitions=2 ledger-dir="{tmp_path / "l"}"']
    assert main(["--data", str(tmp_path / "missing.csv"), *ok]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--", "flower-supernode", "--node-config", "partition-id=2 num-partitions=2"]) == 2
    assert "partition-id = 2 is outside 0..1" in capsys.readouterr().err
    assert main(["--", "flower-supernode"]) == 2
    assert "no --node-config" in capsys.readouterr().err
