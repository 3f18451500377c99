"""Connecting to Ray: an existing cluster when an address is given (``--address auto`` finds one started with
``ray start`` on this machine; ``RAY_ADDRESS`` is set inside ``ray job submit``), else a new local Ray."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when already connected."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to Ray cluster at %s", address)
    else:
        # "local" starts a fresh instance even where `ray start` left a cluster running: no address means local.
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without it the
        # workers' CPUs of a sweep trial that ASHA stopped are never released and the next trial waits forever.
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=True)
        log.info("started a local Ray with %s CPUs; dashboard http://%s", ray.cluster_resources().get("CPU"),
                 context.dashboard_url)
    ray.data.DataContext.get_current().enable_progress_bars = False
