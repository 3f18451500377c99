"""How raycv's processes log: one format for the CLI and what it spawns, and Ray's own INFO lines only with -v.

Without -v a run prints raycv's lines, the progress bars and Ray's warnings; Ray's INFO lines (Ray Data execution
plans, Ray Train's worker-group and checkpoint reports) still go to Ray's log files under its session folder.
"""

from __future__ import annotations

import logging
import os
import warnings
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
    # a sweep stopped by a signal: Tune names its Python API to resume; raycv's own last line names --resume PATH
    "Experiment has been interrupted, but the most recent state was saved.",
)
#: The loggers those warnings come from, in the driver's process.
NOISY_LOGGERS = ("ray.data._internal.progress", "ray.data.dataset",
                 "ray._private.authentication.authentication_token_setup", "ray.tune.tune")
#: Lines of Ray's processes, forwarded to the driver's console, that say nothing to a raycv user, by a part of their
#: text; dropped from the console (not from Ray's log files) unless -v is given:
KNOWN_PROCESS_NOISE = (
    # Ray Train 2.60's controller about the preemption watcher actor Ray Train itself creates (a C++ log line)
    "has constructor arguments in the object store and max_restarts > 0",
    # Ray Train's placement-group cleaner, after every run of a sweep trial
    "Cleaning up placement group",
)
#: A traceback Ray 2.60 prints when it ends a finished sweep trial's process during garbage collection: a batch of
#: lines from one process that starts with the first and holds the second.
SHUTDOWN_TRACEBACK = ("Exception ignored in:", "in sigterm_handler")
#: Ray Train settings a run's driver hands its controller and workers (Ray Train passes these on): a worker's
#: print() goes to its stdout only. Ray Train's own print patch also logged it, with an empty line after each
#: progress-bar update of rank 0: three empty console lines per epoch.
TRAIN_ENVIRONMENT = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
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


def quiet_train_environment() -> None:
    """:data:`TRAIN_ENVIRONMENT` in this driver's environment, for the Ray Train run it is about to start."""
    for name, value in TRAIN_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def worth_showing(lines: list[str]) -> list[str]:
    """The lines of one batch of a Ray process's output that the console shows without -v."""
    if lines and lines[0].startswith(SHUTDOWN_TRACEBACK[0]) and any(SHUTDOWN_TRACEBACK[1] in line for line in lines):
        return []
    return [line for line in lines if not any(noise in line for noise in KNOWN_PROCESS_NOISE)]


def filter_process_output() -> None:
    """Drop :data:`KNOWN_PROCESS_NOISE` from the output of Ray's processes that this driver prints, unless -v.

    Ray prints its processes' lines on the driver through one handler, ``ray_print_logs``, of its (private)
    standard-stream dispatcher; this wraps that handler once. Where Ray has no such handler (another Ray version),
    the console keeps every line.
    """
    if verbose():
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs" or getattr(handler, "raycv_filter", False):
            continue

        def filtered(data: dict, handler=handler) -> None:
            lines = worth_showing(list(data.get("lines", [])))
            if lines:
                handler({**data, "lines": lines})

        filtered.raycv_filter = True
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


def configure_worker_logging(verbose: bool) -> None:
    """In a Ray worker process that runs raycv's code: its INFO lines (progress lines, epoch summaries) on the
    driver's console, DEBUG with -v, and the quiet Ray loggers below."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_worker_loggers(verbose)


def quiet_worker_loggers(verbose: bool) -> None:
    """In a Ray Train worker: Ray Train's per-report lines, Ray Data's execution lines (a single worker runs its
    splits' executions in its own process), MLflow's system-metrics notices and torch's warning about read-only
    input arrays only with -v.

    Ray 2.60 logs "Reporting training result ..." under a logger named by its source file, which Ray Train's own
    ``LoggingConfig`` level does not reach.
    """
    from ray.train.v2._internal.execution import context as train_context

    if not verbose:
        # Ray Data hands a worker that reads a whole split itself read-only arrays of the object store without a
        # copy; torch warns once that writing into such a tensor is undefined, and raycv's steps never do.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    level = logging.INFO if verbose else logging.WARNING
    for name in (train_context.__file__, "ray.data", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(level)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_log_level() -> str:
    """The level of Ray's own loggers in every process of a run (Ray Train's ``LoggingConfig``)."""
    return "INFO" if verbose() else "WARNING"
