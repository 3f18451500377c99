"""``raycv cluster up / status / down``: a local Ray kept running between commands, which every raycv command
without an address then joins, so that none pays Ray's start-up.

It is a ``ray start --head`` on 127.0.0.1 with what raycv's own local Ray has (pipelines.local_ray: token
authentication, the worker-pool config, the quiet console, no preemption watcher), started as the leader of a new
session in a temp dir of its own. ``down`` stops exactly that session's processes, never another Ray on the machine
(``ray stop`` would stop them all). Where it runs is kept in a small JSON file (``$RAYCV_CLUSTER_FILE``, default
``~/.raycv/cluster.json``). Imports no Ray: joining sets the auth mode, which Ray reads once, at import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines import local_ray
from pipelines.failures import RunError

STATE_FILE_ENV = "RAYCV_CLUSTER_FILE"
DEFAULT_STATE_FILE = Path.home() / ".raycv" / "cluster.json"
#: Ray's default GCS and dashboard ports, used when free so that the usual addresses work; else free ports.
DEFAULT_GCS_PORT, DEFAULT_DASHBOARD_PORT = 6379, 8265
#: Ports below this may fall in Ray's default worker port range (10002-19999), which a GCS port must not use.
LOWEST_FREE_PORT = 20000
START_TIMEOUT_S = 180
#: How long its processes get to exit on SIGTERM before SIGKILL (Ray's GCS and autoscaler monitor took over
#: 15 s; the rest exit within 10 s). The cluster's state is thrown away anyway.
STOP_GRACE_S = 3
#: How long a connect to the recorded GCS port may take before the cluster counts as gone.
ALIVE_CHECK_S = 1.0


@dataclass(frozen=True)
class WarmCluster:
    address: str  # the GCS address, what --address / RAY_ADDRESS take
    dashboard_url: str  # also the job API: ray job submit --address DASHBOARD_URL
    cpus: int
    session: int  # session id of the head's processes (the `ray start` process led it)
    temp_dir: str  # Ray's temp dir of this head: its logs are under session_latest/logs
    auth_mode: str  # RAY_AUTH_MODE the head was started with: token (the default) or disabled
    token_path: str | None  # the token file the head was started with (None: token auth off or $RAY_AUTH_TOKEN)


def state_file() -> Path:
    return Path(os.environ.get(STATE_FILE_ENV) or DEFAULT_STATE_FILE)


def recorded() -> WarmCluster | None:
    """The cluster the state file names, alive or not; None without a state file."""
    path = state_file()
    try:
        return WarmCluster(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise RunError(f"{path}: not a raycv cluster file ({exc}); remove it") from None


def running() -> WarmCluster | None:
    """The recorded cluster if its GCS port still answers, else None."""
    cluster = recorded()
    return cluster if cluster is not None and _answers(cluster.address) else None


def join_if_running() -> WarmCluster | None:
    """Point this process (and the Ray it is about to import) at the running warm cluster, if there is one.

    Sets ``RAY_ADDRESS`` and what joining needs before ``ray`` is imported: the auth mode and the token file the
    head was started with (unless this shell sets its own), and the local Ray's driver environment.
    """
    cluster = running()
    if cluster is None:
        return None
    os.environ["RAY_ADDRESS"] = cluster.address
    os.environ.setdefault("RAY_AUTH_MODE", cluster.auth_mode)
    if cluster.token_path and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN_PATH"] = cluster.token_path
    local_ray.prepare_environment()
    return cluster


def up(cpus: int | None = None) -> tuple[WarmCluster, bool]:
    """Start the warm cluster unless it runs already; returns it and whether this call started it."""
    cluster = running()
    if cluster is not None:
        return cluster, False
    stale = recorded()
    if stale is not None:  # its head is gone: clear what is left of it
        _stop(stale)
    cpus = cpus or os.cpu_count() or 1
    local_ray.require_token_auth()
    local_ray.prepare_environment()
    temp_dir = tempfile.mkdtemp(prefix="raycv-warm-")  # short: Ray's unix sockets live under it (~107 chars)
    gcs_port = free_port(DEFAULT_GCS_PORT)
    dashboard_port = free_port(DEFAULT_DASHBOARD_PORT)
    address = f"127.0.0.1:{gcs_port}"
    ray = Path(sys.executable).with_name("ray")
    command = [str(ray) if ray.exists() else "ray", "start", "--head", "--node-ip-address=127.0.0.1",
               f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={cpus}", f"--temp-dir={temp_dir}",
               f"--system-config={json.dumps(local_ray.worker_pool_config(cpus))}", "--disable-usage-stats"]
    # RAY_ADDRESS: Ray's own helper processes that call ray.init() find this head, not another Ray on the machine.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "RAY_ADDRESS": address})
    cluster = WarmCluster(address=address, dashboard_url=f"http://127.0.0.1:{dashboard_port}", cpus=cpus,
                          session=process.pid, temp_dir=temp_dir,
                          auth_mode="token" if local_ray.token_auth() else os.environ["RAY_AUTH_MODE"],
                          token_path=_token_path())
    try:
        output, _ = process.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(cluster)
        raise RunError(f"ray start --head did not finish within {START_TIMEOUT_S} s; stopped it") from None
    if process.returncode != 0:
        _stop(cluster)
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        raise RunError(f"ray start --head failed (exit {process.returncode}): {last[0]}")
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(cluster), indent=1))
    return cluster, True


def down() -> tuple[WarmCluster, int] | None:
    """Stop the recorded cluster's processes and forget it; returns it and how many processes it had, or None when
    none was recorded."""
    cluster = recorded()
    return None if cluster is None else (cluster, _stop(cluster))


def _stop(cluster: WarmCluster) -> int:
    """Stop every process of the head's session (SIGTERM, then SIGKILL after STOP_GRACE_S), remove its temp dir
    and the state file; returns how many processes there were.

    A session id outlives its processes only as a number: after a reboot another session may have it. The session
    is stopped only while one of its processes still names the head's temp dir on its command line (the raylet
    and GCS do).
    """
    import psutil

    procs = session_processes(cluster.session)
    ours = False
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            ours = ours or any(cluster.temp_dir in arg for arg in proc.cmdline())
    if not ours:
        procs = []
    signal_processes(procs, signal.SIGTERM, STOP_GRACE_S)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    state_file().unlink(missing_ok=True)
    return len(procs)


def session_processes(session: int) -> list:
    """The processes (psutil.Process) of session ``session``: a Ray node started as a session leader, with the
    daemons and workers it forked."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) == session:
                found.append(proc)
    return found


def signal_processes(procs: list, sig: int, grace_s: float) -> None:
    """Send ``sig`` to ``procs``; unless it is SIGKILL, SIGKILL those still running ``grace_s`` later."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    if sig == signal.SIGKILL:
        return
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def connection_error(host: str, port: int, timeout: float) -> OSError | None:
    """Why nothing answers a TCP connection to ``host:port`` within ``timeout`` seconds, or None when something does."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return exc
    return None


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return connection_error(host, int(port), ALIVE_CHECK_S) is None


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nothing listens there, else a free port at or above LOWEST_FREE_PORT."""
    if preferred is not None and not _answers(f"127.0.0.1:{preferred}"):
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", preferred))
            return preferred
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= LOWEST_FREE_PORT:
            return port


def _token_path() -> str | None:
    if not local_ray.token_auth() or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(local_ray.DEFAULT_TOKEN_FILE)
