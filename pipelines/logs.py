"""How raycv's processes log: one format for the CLI and what it spawns, and Ray's own INFO lines only with -v.

Without -v a run prints raycv's lines, the progress bars and Ray's warnings; Ray's INFO lines (Ray Data execution
plans, Ray Train's worker-group and checkpoint reports) still go to Ray's log files under its session folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

#: Set by ``raycv -v``; read by the driver-side code that configures Ray (and inherited by processes it starts).
VERBOSE_ENV = "RAYCV_VERBOSE"
#: Ray's loggers whose INFO lines only ``-v`` shows on the console.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
#: Warnings of Ray 2.60 that say nothing to a raycv user, by the start of their message, dropped from the console
#: (not from Ray's log files) unless -v is given:
KNOWN_NOISE = (
    # raycv turns Ray Data's bars off on purpose (pipelines.progress draws its own); logged once per process
    "Progress bars disabled.",
    # raycv leaves Ray Data a CPU beside the training workers; it warns while a split's decode tasks hold them all
    "Warning: The Ray cluster currently does not have any available CPUs.",
    # a new local Ray turns token auth on by itself (raycv's README says so, and raycv keeps the token private)
    "Token authentication is enabled for this Ray cluster.",
)
#: The loggers those warnings come from, in the driver's process.
NOISY_LOGGERS = ("ray.data._internal.progress", "ray.data.dataset",
                 "ray._private.authentication.authentication_token_setup")
#: Ray Data's logging config for the processes of a local Ray (``RAY_DATA_LOGGING_CONFIG``): its own default, with
#: the console dropping :data:`KNOWN_NOISE`.
RAY_DATA_LOGGING_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")


class KnownNoise(logging.Filter):
    """Drops the records whose message starts with one of :data:`KNOWN_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KNOWN_NOISE)


def configure(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def set_verbose(verbose: bool) -> None:
    """raycv's own lines at DEBUG and Ray's INFO lines shown when ``verbose``, else raycv's INFO and Ray's warnings."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    configure(logging.DEBUG if verbose else logging.INFO)
    quiet_ray_loggers()


def quiet_ray_loggers() -> None:
    """Ray's loggers at INFO with -v, else WARNING; applied again after Ray Data, which sets its logger's level when
    first imported, is in use."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose() else logging.WARNING)
    for name in NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        for existing in [f for f in noisy.filters if isinstance(f, KnownNoise)]:
            noisy.removeFilter(existing)
        if not verbose():
            noisy.addFilter(KnownNoise())


def quiet_local_ray_environment() -> None:
    """What the processes of a local Ray about to start inherit without -v: Ray Data's console at WARNING without
    :data:`KNOWN_NOISE` (its INFO lines still reach ray-data.log), and no DeprecationWarnings (Ray Train's own use
    of Ray Data's deprecated options prints one from every run's dataset manager)."""
    if verbose():
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING_CONFIG))
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def quiet_worker_loggers(verbose: bool) -> None:
    """In a Ray Train worker: Ray Train's per-report lines and MLflow's system-metrics notices only with -v.

    Ray 2.60 logs "Reporting training result ..." under a logger named by its source file, which Ray Train's own
    ``LoggingConfig`` level does not reach.
    """
    from ray.train.v2._internal.execution import context as train_context

    level = logging.INFO if verbose else logging.WARNING
    for name in (train_context.__file__, "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(level)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_log_level() -> str:
    """The level of Ray's own loggers in every process of a run (Ray Train's ``LoggingConfig``)."""
    return "INFO" if verbose() else "WARNING"
