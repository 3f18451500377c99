"""Real services for the tests: a local Ray cluster with token authentication and an MLflow tracking server.

Both are started as the user would start them (``ray start --head``, ``mlflow server``) and stopped completely
(``ray stop``; the MLflow server's whole process group, since it forks helper processes).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
#: Logical CPUs the test cluster advertises: Ray Train workers and Ray Data tasks must fit side by side on a
#: 2-core machine (the cores are shared, only the scheduler's bookkeeping is raised).
TEST_CLUSTER_CPUS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # what a client needs: token auth mode and token path
    temp_dir: Path  # the cluster's own Ray temp dir: every one of its processes names it on its command line


def enable_token_auth(workdir: Path) -> dict[str, str]:
    """Write a fresh Ray auth token and switch this process (and its children) to token auth.

    Must run before ``ray`` is first imported: Ray reads the auth mode once, at import.
    """
    token = workdir / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    os.environ.update(env)
    return env


def start_ray_cluster(env: dict[str, str]) -> RayCluster:
    """``ray start --head`` with the token auth ``env``; jobs it runs find this virtualenv's ``raycv`` on PATH."""
    # Short: Ray's unix sockets live under it and socket paths are limited to ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="raycv-ray-"))
    port, dash = free_port(), free_port()
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={TEST_CLUSTER_CPUS}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        check=True, capture_output=True,
        # RAY_ADDRESS: Ray's own helper processes that call ray.init() find this cluster even where other Ray
        # instances run on the same machine.
        env={**os.environ, **env, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": f"127.0.0.1:{port}"},
    )
    return RayCluster(gcs_address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dash}", env=env,
                      temp_dir=temp_dir)


def _cluster_processes(cluster: RayCluster) -> list:
    """This cluster's processes: those naming its temp dir or GCS address, and all their descendants."""
    import psutil

    port = cluster.gcs_address.rsplit(":", 1)[1]
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(cluster.temp_dir) in cmdline or "--address=" in cmdline and f":{port} " in f"{cmdline} ":
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in proc.children(recursive=True)})
    return list(found.values())


def stop_ray_cluster(cluster: RayCluster) -> None:
    """Stop this cluster's processes only (``ray stop`` would also stop any other Ray on the machine)."""
    import psutil

    procs = _cluster_processes(cluster)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen


def start_mlflow_server(workdir: Path) -> MlflowServer:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "mlflow-server.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited; see {workdir / 'mlflow-server.log'}")
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200

    wait_for(healthy, f"mlflow server on {url}", timeout=120)
    return MlflowServer(url=url, process=process)


def stop_mlflow_server(server: MlflowServer) -> None:
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.process.pid, signal.SIGKILL)
