"""How raycv sets up a Ray it starts on this machine, the one ``ray.init`` starts for a command without an address
and the one ``raycv cluster up`` keeps running (pipelines.warm_cluster). Imports no Ray: the auth mode must be in
the environment before ``ray`` is first imported, which reads it once.

Who may use such a Ray: its dashboard (the job API: whoever can submit a job runs code as this user) listens on
127.0.0.1 only, which keeps other machines out but not other users of this machine. Against those it runs with
Ray's token authentication: the token is ``RAY_AUTH_TOKEN`` / the file ``RAY_AUTH_TOKEN_PATH`` when set, else
``~/.ray/auth_token``, which is created readable by this user only. ``RAY_AUTH_MODE=disabled`` turns that off (with a
warning); the token then no longer protects the job API, and any local user can run jobs as you.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from pipelines import logs

log = logging.getLogger(__name__)

#: Where Ray looks for its token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set.
DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"
#: Worker processes a node keeps at least, busy or idle, before it ends idle ones (Ray's default: one per CPU).
MIN_WORKERS_KEPT = 8
#: How long an idle worker over that limit lives on (Ray's default: 1 s).
IDLE_WORKER_MS = 60_000
#: Ray Train's switch for its preemption watcher (Ray Train passes it from the driver to its processes).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


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


def prepare_environment() -> None:
    """What a local Ray about to start, and each driver of it, needs in this process's environment.

    Ray's processes inherit Ray Data's quiet console (pipelines.logs); Ray Train's preemption watcher (one more
    actor process per run) is off, since it polls for nodes being drained, which a local Ray has none of.
    """
    logs.quiet_local_ray_environment()
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def require_token_auth() -> None:
    """Token authentication for the local Ray about to start, unless the user turned it off.

    Ray 2.60 turns it on for a new local Ray by itself when ``RAY_AUTH_MODE`` is unset, but writes a missing
    ``~/.ray/auth_token`` with the default umask, often readable by every local user, who could then submit jobs:
    this creates that file first, private to this user.
    """
    if not token_auth():
        log.warning("RAY_AUTH_MODE=%s: the local Ray's job API on 127.0.0.1 accepts jobs from every user of this "
                    "machine", os.environ["RAY_AUTH_MODE"])
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        _write_private_token(DEFAULT_TOKEN_FILE)


def token_auth() -> bool:
    """Whether a Ray started from this environment uses token authentication (the default)."""
    return os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"


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
