"""Connecting to Ray: an existing cluster when an address is given (``--address auto`` finds one started with
``ray start`` on this machine; ``RAY_ADDRESS`` is set inside ``ray job submit`` and by ``raycv cluster up``'s
pipelines.warm_cluster), else a new local Ray, set up as pipelines.local_ray says (token authentication on
127.0.0.1).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import ray

from pipelines import local_ray, logs
from pipelines.failures import RunError
from pipelines.interrupts import RunInterrupted
from pipelines.warm_cluster import connection_error

log = logging.getLogger(__name__)

#: How long to wait for a cluster's address to accept a connection before saying nothing answers there.
CONNECT_CHECK_SECONDS = 5


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when already connected."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _require_listener(address)
        try:
            _ray_init(address=address, log_to_driver=True, logging_level=logs.ray_log_level())
        except ConnectionError as exc:
            raise RunError(f"cannot connect to the Ray cluster at {address} ({str(exc).splitlines()[0]}): is it "
                           "running? A cluster with token authentication (Ray's default) also needs "
                           "RAY_AUTH_MODE=token in this shell and its token in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH "
                           "or ~/.ray/auth_token") from exc
        log.info("connected to Ray cluster at %s", address)
    else:
        local_ray.require_token_auth()
        local_ray.prepare_environment()
        # "local" starts a fresh instance even where `ray start` left a cluster running: no address means local.
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without it the
        # workers' CPUs of a sweep trial that ASHA stopped are never released and the next trial waits forever.
        context = _ray_init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                            log_to_driver=True, logging_level=logs.ray_log_level(),
                            _system_config=local_ray.worker_pool_config(num_cpus or os.cpu_count() or 1))
        log.info("started a local Ray with %s CPUs; dashboard http://%s", ray.cluster_resources().get("CPU"),
                 context.dashboard_url)
    logs.filter_process_output()
    quiet_data_context()


def _ray_init(**kwargs: Any) -> Any:
    """``ray.init``, where a SIGTERM stops the command with a line that says so: ``ray.init`` first installs Ray's
    own SIGTERM handler, which exits with the signal's number and no word (``sys.exit(15)``); a local Ray's
    processes, started as its children, go with the process."""
    try:
        return ray.init(**kwargs)
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            raise RunInterrupted(signal.SIGTERM, "stopped by SIGTERM while Ray started") from None
        raise


def _require_listener(address: str) -> None:
    """Fail in one line when nothing listens at a ``host:port`` (or ``ray://host:port``) address: Ray itself would
    retry for many minutes before giving up. Other forms (``auto``) are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        return
    error = connection_error(host, int(port), CONNECT_CHECK_SECONDS)
    if error is not None:
        raise RunError(f"cannot connect to the Ray cluster at {address}: nothing answers there ({error}); start it "
                       "(ray start --head) or fix --address / RAY_ADDRESS")


def quiet_data_context() -> None:
    """Ray Data in this process (a driver, or a sweep trial that drives a run) without its own progress bars, which
    the run's say better (pipelines.progress), and its execution plans only with -v."""
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = logs.verbose()  # each pipeline's plan, every epoch
    logs.quiet_ray_loggers()
