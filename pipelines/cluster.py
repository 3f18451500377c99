"""Connecting to Ray: an existing cluster when an address is given (``--address auto`` finds one started with
``ray start`` on this machine; ``RAY_ADDRESS`` is set inside ``ray job submit``), else a new local Ray.

Who may use the local Ray: its dashboard (the job API: whoever can submit a job runs code as this user) listens
on 127.0.0.1 only, which keeps other machines out but not other users of this machine. Against those it runs with
Ray's token authentication: the token is ``RAY_AUTH_TOKEN`` / the file ``RAY_AUTH_TOKEN_PATH`` when set, else
``~/.ray/auth_token``, which is created readable by this user only. ``RAY_AUTH_MODE=disabled`` turns that off (with a
warning); the token then no longer protects the job API, and any local user can run jobs as you.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

import ray

from pipelines import logs
from pipelines.failures import RunError

log = logging.getLogger(__name__)

#: Where Ray looks for its token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set.
DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"
#: Worker processes a node keeps at least, busy or idle, before it ends idle ones (Ray's default: one per CPU).
MIN_WORKERS_KEPT = 8
#: How long an idle worker over that limit lives on (Ray's default: 1 s).
IDLE_WORKER_MS = 60_000
#: Ray Train's switch for its preemption watcher (Ray Train passes it from the driver to its processes).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
#: How long to wait for a cluster's address to accept a connection before saying nothing answers there.
CONNECT_CHECK_SECONDS = 5


def worker_pool_config(cpus: float) -> dict[str, int]:
    """Ray system config that keeps a run's idle Ray Data workers alive between its epochs on a small node.

    A run holds about five actors besides its Train workers (Ray Train's controller, placement-group cleaner,
    synchronisation actor and preemption watcher, Ray Data's coordinators). On a node with few CPUs they alone
    exceed Ray's default of one worker process per CPU, so Ray ended every idle decode/augment worker within a
    second and started a new one (importing torch, ~8 s of CPU) for each map of each epoch. Measured on the tests'
    two-node cluster (2 CPUs per node): a one-epoch hotdog run took 109 s instead of 122 s.
    """
    return {"num_workers_soft_limit": max(int(cpus), MIN_WORKERS_KEPT), "idle_worker_killing_time_threshold_ms":
            IDLE_WORKER_MS}


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when already connected."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _require_listener(address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logs.ray_log_level())
        except ConnectionError as exc:
            raise RunError(f"cannot connect to the Ray cluster at {address} ({str(exc).splitlines()[0]}): is it "
                           "running? A cluster with token authentication (Ray's default) also needs "
                           "RAY_AUTH_MODE=token in this shell and its token in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH "
                           "or ~/.ray/auth_token") from exc
        log.info("connected to Ray cluster at %s", address)
    else:
        _require_token_auth()
        # Inherited by every process of this local Ray: Ray Data's coordinators log each execution at INFO.
        logs.quiet_local_ray_environment()
        # Ray Train's preemption watcher (one more actor process per run) polls for nodes being drained, which a
        # local Ray has none of.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        # "local" starts a fresh instance even where `ray start` left a cluster running: no address means local.
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without it the
        # workers' CPUs of a sweep trial that ASHA stopped are never released and the next trial waits forever.
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=True, logging_level=logs.ray_log_level(),
                           _system_config=worker_pool_config(num_cpus or os.cpu_count() or 1))
        log.info("started a local Ray with %s CPUs; dashboard http://%s", ray.cluster_resources().get("CPU"),
                 context.dashboard_url)
    logs.filter_process_output()
    quiet_data_context()


def _require_listener(address: str) -> None:
    """Fail in one line when nothing listens at a ``host:port`` (or ``ray://host:port``) address: Ray itself would
    retry for many minutes before giving up. Other forms (``auto``) are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_CHECK_SECONDS).close()
    except OSError as exc:
        raise RunError(f"cannot connect to the Ray cluster at {address}: nothing answers there ({exc}); start it "
                       "(ray start --head) or fix --address / RAY_ADDRESS") from None


def quiet_data_context() -> None:
    """Ray Data in this process (a driver, or a sweep trial that drives a run) without its own progress bars, which
    the run's say better (pipelines.progress), and its execution plans only with -v."""
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = logs.verbose()  # each pipeline's plan, every epoch
    logs.quiet_ray_loggers()


def _require_token_auth() -> None:
    """Token authentication for the local Ray about to start, unless the user turned it off.

    Ray 2.60 turns it on for a new local Ray by itself when ``RAY_AUTH_MODE`` is unset (setting the variable here
    instead would not reach Ray's cached config), but writes a missing ``~/.ray/auth_token`` with the default umask,
    often readable by every local user, who could then submit jobs: this creates that file first, private to this
    user.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode != "token":
        log.warning("RAY_AUTH_MODE=%s: the local Ray's job API on 127.0.0.1 accepts jobs from every user of this "
                    "machine", mode)
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        _write_private_token(DEFAULT_TOKEN_FILE)


def _write_private_token(path: Path) -> None:
    """Create ``path`` holding a new random token, readable and writable by this user only; keep an existing one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    log.info("wrote a new Ray auth token to %s (readable by you only)", path)
