"""The deployment topology (deploy/topology.py) as real processes on 127.0.0.1, for tests and local trials.

Starts `flower-superlink` (TLS + SuperNode authentication, `--isolation process`), a `flower-superexec` for
the ServerApp, registers each SuperNode's public key with `flwr supernode register`, then per SuperNode a
`flower-supernode` (its own node config, auth key, FLWR_HOME, ledger dir) and its `flower-superexec` for the
ClientApp. Every process runs in its own session (process group) and is killed by group when the context exits.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from simulations.flower_sim import _bin, free_port
from deploy.topology import DEFAULT, CA_CERT, SuperNodeSpec, Topology, auth_public_key

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "fedlora-deploy"
STARTUP_SECONDS = 60.0


def base_env(flwr_home: Path) -> dict[str, str]:
    return dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
                PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Deployment:
    root: Path
    certs: Path
    superlink_port: int
    cli_env: dict[str, str]                 # env for `flwr` commands (FLWR_HOME with the TLS connection)
    procs: list[Proc] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        log = self.root / f"{name}.log"
        handle = open(log, "wb")  # noqa: SIM115 - closed with the process group
        program = sys.executable if args[0] == "python" else _bin(args[0])
        popen = subprocess.Popen([program, *args[1:]], env=env, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=cwd or REPO)
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.cli_env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} (rc={p.popen.poll()}) -----\n{p.tail()}" for p in self.procs)


def write_cli_config(home: Path, address: str, ca_cert: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = "{ca_cert}"\n'
    )


def wait_healthy(proc: Proc, url: str, ca_cert: Path, seconds: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=0.5, verify=ssl.create_default_context(cafile=str(ca_cert))).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name} did not become healthy at {url} within {seconds:.0f}s\n{proc.tail()}")


def register(deployment: Deployment, public_key: Path) -> None:
    result = deployment.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
    if result.returncode != 0:
        raise RuntimeError(f"flwr supernode register {public_key} failed:\n{result.stdout}\n{result.stderr}")


def online_nodes(deployment: Deployment) -> list[dict]:
    result = deployment.flwr("supernode", "ls", CONNECTION, "--format", "json")
    if result.returncode != 0:
        return []
    try:
        payload = json.loads(result.stdout)
    except json.JSONDecodeError:
        return []
    return [n for n in payload.get("nodes", []) if str(n.get("status", "")).lower() == "online"]


def wait_online(deployment: Deployment, count: int, seconds: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for proc in deployment.procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}\n{deployment.logs()}")
        if len(online_nodes(deployment)) >= count:
            return
        time.sleep(1.0)
    raise RuntimeError(f"fewer than {count} SuperNodes online after {seconds:.0f}s\n{deployment.logs()}")


def stop(proc: Proc) -> None:
    """SIGTERM the process group, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.popen.wait(timeout=wait)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    try:  # children may outlive a leader that exited on SIGTERM
        os.killpg(proc.popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_supernode(deployment: Deployment, node: SuperNodeSpec, ledger_dir: Path, data: Path | str,
                    topology: Topology = DEFAULT, max_wait_time: float | None = None,
                    with_superexec: bool = True) -> Proc:
    """A SuperNode (its own FLWR_HOME) and, unless told not to, the SuperExec that runs its ClientApps."""
    home = deployment.root / node.service / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(home)
    port = free_port()
    proc = deployment.start(node.service, topology.supernode_command(
        node, str(data), certs=str(deployment.certs), superlink_address=deployment.address, host="127.0.0.1",
        port=port, ledger_dir=str(ledger_dir), max_wait_time=max_wait_time), env, cwd=REPO)
    if with_superexec:
        deployment.start(node.superexec_service,
                         topology.superexec_args(str(deployment.certs), f"localhost:{port}"), env)
    return proc


@contextmanager
def loopback_deployment(root: Path, certs: Path, ledger_dirs: dict[str, Path], data: dict[str, Path | str],
                        topology: Topology = DEFAULT):
    """Yield a running Deployment with every SuperNode of `topology` registered and online."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cli_home = root / "cli-home"
    write_cli_config(cli_home, f"127.0.0.1:{port}", certs / CA_CERT)
    deployment = Deployment(root=root, certs=certs, superlink_port=port, cli_env=base_env(cli_home))
    try:
        link_home = root / topology.superlink_service / "flwr-home"
        link_home.mkdir(parents=True, exist_ok=True)
        link_env = base_env(link_home)
        superlink = deployment.start(topology.superlink_service, topology.superlink_command(
            str(certs), "127.0.0.1", port, str(root / "superlink-state.db")), link_env)
        wait_healthy(superlink, f"https://127.0.0.1:{port}/health", certs / CA_CERT)
        deployment.start(topology.superexec_serverapp_service,
                         topology.superexec_args(str(certs), f"localhost:{port}"), link_env)
        for node in topology.supernodes:
            register(deployment, certs / auth_public_key(node.service))
        for node in topology.supernodes:
            start_supernode(deployment, node, ledger_dirs[node.service], data[node.service], topology)
        wait_online(deployment, len(topology.supernodes))
        yield deployment
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
