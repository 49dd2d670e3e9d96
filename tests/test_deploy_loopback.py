"""The deployment topology (deploy/topology.py, the same as docker-compose.yml) as real processes on 127.0.0.1.

`flower-superlink` with TLS and SuperNode authentication, a SuperExec for the ServerApp, two registered
SuperNodes (each its own node config, auth key, FLWR_HOME and ledger dir) with their SuperExecs, then
`flwr run . <connection>` over TLS: 2 rounds of LoRA under DP-SGD with fedsvd on a toy CSV. A SuperNode whose
key was never registered is refused; bad node settings fail fast with a clear message.
Every process runs in its own process group and is killed by group when the module's tests end.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest

from deploy.loopback import (CONNECTION, REPO, Deployment, base_env, loopback_deployment, online_nodes,
                             start_supernode, stop)
from deploy.topology import CA_CERT, DEFAULT, SERVER_CERT, SERVER_KEY, SuperNodeSpec
from scripts.gen_certs import generate, make_ca, make_server_cert, validity
from simulations.flower_sim import free_port
from common.config import RunConfig
from common.data.partition import client_data
from common.privacy import poisson_sample_rate
from tests.conftest import write_toy_csv

RUN_TIMEOUT = 480
ORG_ROWS_PER_CLASS = (40, 24)
TINY = ('num-rounds=2 clients-per-round=2 local-steps=3 batch-size=16 max-seq-len=32 examples-per-class=40 '
        'lr=0.02 target-epsilon=50.0 strategy="fedsvd" partitioner="iid"')


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    names = [node.service for node in DEFAULT.supernodes]
    certs = generate(root / "certs", [*names, "intruder"], DEFAULT.superlink_service)
    csv = write_toy_csv(root / "server-data")  # the server's file: its global test set
    # each organisation's own file, of a different size, given to its node only (node-config dataset)
    own = {name: write_toy_csv(root / name / "data", per_class=ORG_ROWS_PER_CLASS[i]) for i, name in enumerate(names)}
    return {"root": root, "certs": certs, "csv": csv, "own": own,
            "ledgers": {name: root / name / "ledger" for name in names}}


@pytest.fixture(scope="module")
def deployment(site):
    with loopback_deployment(site["root"], site["certs"], site["ledgers"], site["own"]) as running:
        yield running


def test_superlink_serves_tls_only(deployment):
    import httpx

    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.get(f"http://{deployment.address}/health", timeout=2)
    with pytest.raises(httpx.HTTPError):  # TLS without our CA
        httpx.get(f"https://{deployment.address}/health", timeout=2)


def test_unregistered_supernode_is_refused(deployment, site):
    intruder = start_supernode(deployment, SuperNodeSpec("intruder", 0, 2), site["root"] / "intruder" / "ledger",
                               site["csv"], max_wait_time=20, with_superexec=False)
    try:
        intruder.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key was not refused within 60 s\n" + intruder.tail())
    assert intruder.popen.returncode != 0
    assert "Failed to activate SuperNode" in intruder.tail(), intruder.tail()
    assert len(online_nodes(deployment)) == len(DEFAULT.supernodes)


@pytest.mark.parametrize("node_config, data, message", [
    (SuperNodeSpec("badpid", 5, 2), None, "partition-id = 5 is outside 0..1"),
    (SuperNodeSpec("nodata", 0, 2), "missing.csv", "does not exist"),
])
def test_bad_supernode_settings_fail_fast(deployment, site, node_config, data, message):
    data_path = site["root"] / data if data else site["csv"]
    started = time.monotonic()
    proc = start_supernode(deployment, node_config, site["root"] / node_config.service / "ledger", data_path,
                           max_wait_time=10, with_superexec=False)
    proc.popen.wait(timeout=30)
    assert proc.popen.returncode == 2 and message in proc.tail(), proc.tail()
    assert time.monotonic() - started < 30


def _supernode_exits(proc, seconds: float = 60) -> str:
    try:
        proc.popen.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} still running after {seconds:.0f} s\n{proc.tail()}")
    assert proc.popen.returncode == 2, proc.tail()
    return proc.tail()


def test_supernode_with_another_ca_is_refused_at_start(deployment, site):
    """Its CA cannot verify the SuperLink's certificate: preflight's TLS probe says so and exits, no retries."""
    other = site["root"] / "other-ca"
    other.mkdir(exist_ok=True)
    make_ca(other)
    node = DEFAULT.supernodes[0]
    command = DEFAULT.supernode_command(node, str(site["csv"]), certs=str(deployment.certs),
                                       superlink_address=deployment.address, host="127.0.0.1", port=free_port(),
                                       ledger_dir=str(site["root"] / "other-ca-ledger"), max_wait_time=10)
    command[command.index("--root-certificates") + 1] = str(other / CA_CERT)
    started = time.monotonic()
    proc = deployment.start("other-ca-node", command, base_env(site["root"] / "other-ca-home"))
    tail = _supernode_exits(proc)
    assert f"error: the server at {deployment.address} presented a certificate that" in tail
    assert "issued by another CA" in tail and time.monotonic() - started < 30
    assert len(online_nodes(deployment)) == len(DEFAULT.supernodes)


def test_expired_superlink_certificate_is_refused_on_both_sides(site, tmp_path):
    """The SuperLink's preflight will not start on an expired certificate; a flower-superlink started on one
    anyway (no preflight) is refused by every SuperNode's preflight at once, with the reason."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs = tmp_path / "certs"
    shutil.copytree(site["certs"], certs)
    ca_cert = x509.load_pem_x509_certificate((certs / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    make_server_cert(certs, "server", ["superlink"], ca_cert, ca_key, valid=validity(days=1, start_days=-10))
    assert SERVER_CERT == "server.pem" and SERVER_KEY == "server.key"
    deployment = Deployment(root=tmp_path, certs=certs, superlink_port=free_port(), cli_env={})
    env = base_env(tmp_path / "link-home")
    try:
        refused = deployment.start("preflight-superlink", DEFAULT.superlink_command(
            str(certs), "127.0.0.1", deployment.superlink_port, str(tmp_path / "state.db")), env)
        assert "error: certificate" in _supernode_exits(refused, 30) and "expired on" in refused.tail()
        deployment.start("superlink", DEFAULT.superlink_args(  # bypass the preflight: serve the expired one
            str(certs), "127.0.0.1", deployment.superlink_port, str(tmp_path / "state.db")), env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", deployment.superlink_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("flower-superlink did not listen within 60 s\n" + deployment.logs())
        node = start_supernode(deployment, DEFAULT.supernodes[0], tmp_path / "ledger", site["csv"],
                               max_wait_time=10, with_superexec=False)
        tail = _supernode_exits(node)
        assert "certificate has expired" in tail and "must be renewed" in tail, tail
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)


@pytest.mark.slow
def test_tls_node_auth_run_completes(deployment, site):
    run_dir = site["root"] / "run"
    config = f'{TINY} dataset="{site["csv"]}" run-dir="{run_dir}"'
    started = time.monotonic()
    result = deployment.flwr("run", str(REPO), CONNECTION, "--stream", "--run-config", config,
                             timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + deployment.logs()
    report = json.loads((run_dir / "privacy.json").read_text())
    assert {client["id"] for client in report["clients"]} == {"0", "1"}, report
    for client in report["clients"]:
        assert [row["round"] for row in client["history"]] == [1, 2]
        assert 0 < client["epsilon"] <= 50.0
    # each organisation's ledger is on its own node's ledger path, and only there
    for node in DEFAULT.supernodes:
        ledgers = sorted(p.name for p in site["ledgers"][node.service].iterdir())
        assert ledgers == [f"client-{node.partition_id}.json"], (node.service, ledgers)
    assert not (run_dir / "ledgers").exists()
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients-trained"] for r in rounds[1:]] == [2, 2]
    # each node trained on its own organisation's file: its sampling rate is that of its partition of it
    settings = dict(item.split("=", 1) for item in TINY.split())
    for node in DEFAULT.supernodes:
        config = RunConfig.from_flower({k: json.loads(v) if not v.startswith('"') else v.strip('"')
                                        for k, v in settings.items()} | {"dataset": str(site["own"][node.service])})
        train = client_data(config, node.partition_id, node.num_partitions).train
        client = next(c for c in report["clients"] if c["id"] == str(node.partition_id))
        assert client["history"][0]["sample_rate"] == pytest.approx(poisson_sample_rate(len(train), 16))
    print(f"deployed run: {time.monotonic() - started:.0f} s", file=sys.stderr)
