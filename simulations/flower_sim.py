"""Run this Flower App as a local simulation with `flwr run`, on a SuperLink we start and stop.

We start `flower-superlink --simulation` ourselves (free loopback ports, a private FLWR_HOME, runtime
dependency installation disabled so the CPU torch in this venv is used) instead of the auto-started
`:local:` one, because that one outlives the command; ours is stopped in a `finally`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import httpx

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedlora-sim"
STARTUP_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (works without an activated venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


@contextmanager
def simulation_superlink():
    """Yield the environment for `flwr run` against a fresh simulation SuperLink; stop it afterwards."""
    home = Path(tempfile.mkdtemp(prefix="fedlora-flwr-"))
    http_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
               # The SuperLink spawns flower-superexec and friends by name: put this venv first.
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    log_file = home / "superlink.log"
    process = subprocess.Popen(
        [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(http_port),
         "--database", str(home / "state.db"), "--log-file", str(log_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=APP_DIR,
    )
    try:
        _wait_healthy(process, http_port, log_file)
        yield env
    finally:
        _stop(process)
        shutil.rmtree(home, ignore_errors=True)


def _wait_healthy(process: subprocess.Popen, port: int, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text()[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not become healthy within {STARTUP_SECONDS:.0f}s")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the SuperLink's process group and every process below it, then SIGKILL what is left.

    The descendants are listed first and by pid: flower-superexec starts a session (process group) of its
    own, and the simulation under it (ServerApp and ClientApps) would run on, orphaned, if only the
    SuperLink's group were signalled. psutil comes with Ray.
    """
    import psutil

    try:
        below = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for child in below:
            try:
                child.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        _, below = psutil.wait_procs(below, timeout=wait)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not below:
            return


def flwr_run(env: dict, run_config: dict, num_supernodes: int, cpus_per_client: int = 1,
             gpus_per_client: float = 0.0, stdout=None, timeout: float | None = None,
             until: Callable[[], bool] | None = None) -> int | None:
    """`flwr run . fedlora-sim --stream` with these run-config overrides; returns its exit code.

    `stdout`: where Flower's log goes (default: ours). With `timeout` (seconds), a run still going then is
    killed and None returned (the SuperLink's simulation stops with the SuperLink). `until`: polled every
    0.2 s; once it returns True, the same (tests/test_e2e_resume.py stops a run after a given round).
    """
    overrides = " ".join(f"{key}={_toml(value)}" for key, value in run_config.items())
    command = [
        _bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream",
        "--run-config", overrides,
        "--federation-config", federation_config(num_supernodes, cpus_per_client, gpus_per_client),
    ]
    process = subprocess.Popen(command, env=env, cwd=APP_DIR, stdout=stdout,
                               stderr=subprocess.STDOUT if stdout is not None else None)
    deadline = None if timeout is None else time.monotonic() + timeout
    while process.poll() is None:
        if (deadline is not None and time.monotonic() > deadline) or (until is not None and until()):
            process.kill()
            process.wait()
            return None
        time.sleep(0.2)
    return process.returncode


def federation_config(num_supernodes: int, cpus_per_client: int, gpus_per_client: float) -> str:
    """Simulation resources. Ray hides the GPU from a ClientApp that asks for none, so ask for a share."""
    config = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
    if gpus_per_client > 0:
        config += f" client-resources-num-gpus={gpus_per_client:g}"
    return config


def gpu_share(num_supernodes: int) -> float:
    """Each simulated client's share of the GPU (0 without one): all clients fit on it at once."""
    import torch

    return round(1.0 / num_supernodes, 4) if torch.cuda.is_available() else 0.0


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return repr(value)
