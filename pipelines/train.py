"""The driver side of one training run: MLflow run, Ray Data pipelines, a Ray Train ``TorchTrainer``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer

from cvtasks import storage as storage_paths
from cvtasks.errors import DataFormatError
from cvtasks.settings import TaskConfig
from cvtasks.tasks import get_task
from cvtasks.tasks.base import Task
from pipelines import failures, logs, tracking
from pipelines.config import ConfigError, check_values
from pipelines.data import augments_in_worker, build_split, should_cache, task_path, workers_read_whole_splits
from pipelines.handoff import FailFastCallback, ResolvedWeights, train_loop_per_worker
from pipelines.interrupts import RunInterrupted, fit_run, stop_signals_raise
from pipelines.progress import console_style
from pipelines.run_logging import FIRST_STEP_TAG
from pipelines.steps import lr_factor, make_optimizer
from pipelines.weights import check_weights, put_weights

log = logging.getLogger(__name__)

#: Checkpoints kept per run: the newest two, enough to resume after a failure while a new one is being written.
CHECKPOINTS_KEPT = 2
#: MLflow tag of a failed run: what went wrong, in one line.
ERROR_TAG = "raycv.error"


@dataclass
class TrainOutcome:
    run_id: str
    experiment_id: str
    metrics: dict[str, Any]
    wall_seconds: float
    registered_version: str | None = None  # the model's version of raycv-<task> (alias ``latest``), if registered
    #: where the seconds went, in order (also the run's ``seconds_*`` metrics)
    phases: dict[str, float] = field(default_factory=dict)


def default_storage() -> str:
    """Where Ray Train keeps checkpoints: ``RAYCV_STORAGE`` (shared storage on a cluster) or ./ray_results."""
    return os.environ.get("RAYCV_STORAGE") or str(Path("ray_results").resolve())


def with_absolute_data_root(cfg: TaskConfig) -> TaskConfig:
    """``cfg`` with a local ``data.root`` made absolute: Ray workers and Tune trials run in other folders."""
    return cfg.with_values({"data.root": storage_paths.absolute(cfg.data.root)})


def cpus_for_training(cluster_cpus: float, held_cpus: float = 0.0) -> float:
    """The cluster's CPUs that training workers may hold: of what ``held_cpus`` (the sweep trial functions that
    drive them) leave, one CPU (half of a single CPU) stays free for Ray Data."""
    free = cluster_cpus - held_cpus
    return free - 1.0 if free > 1 else free / 2


def worker_cpus(requested: float, workers: int, cluster_cpus: float, held_cpus: float = 0.0) -> float:
    """CPUs per training worker, lowered where the workers would take the CPU Ray Data needs.

    Ray Data decodes and augments in Ray tasks that need a whole CPU of their own: without one, training waits
    forever for its first batch (e.g. 2 workers x 1 CPU on a 2-CPU laptop, or 1 worker x 1 CPU next to a sweep
    trial function's 0.01 CPU).
    """
    spare = cpus_for_training(cluster_cpus, held_cpus)
    if requested * workers <= spare or spare <= 0:
        return requested
    lowered = spare / workers
    held = f" ({held_cpus:g} held by sweep trials)" if held_cpus else ""
    log.warning("%d workers x %g CPU would leave Ray Data no CPU on this %g-CPU cluster%s: using %.2f CPU per "
                "worker", workers, requested, cluster_cpus, held, lowered)
    return lowered


def check_config(cfg: TaskConfig) -> None:
    """Refuse, on the driver, config values a worker would fail on: numeric ranges, optimizer, schedule, cache, the
    standardisation of the model's inputs (the task's ``input_stats``, which only the training worker applies).

    The names are checked by the functions the workers call with them, so the lists of valid names stay in one
    place.
    """
    check_values(cfg)
    try:
        lr_factor(cfg.optim.schedule, 0, 1)
        should_cache(cfg.data.cache, 0, 0.0)
        augments_in_worker(cfg)
        get_task(cfg.task).input_stats(cfg)
        make_optimizer([{"params": [torch.zeros(1, requires_grad=True)]}], cfg.optim)
    except ValueError as exc:  # torch's own checks (e.g. "Invalid momentum value") raise ValueError too
        raise ConfigError(str(exc)) from None


def check_data(task: Task, cfg: TaskConfig) -> None:
    """Refuse, on the driver and without Ray, data a run cannot train on: a missing or unreadable root, an empty
    split, a split whose labels the model's classes do not cover (class lists that differ between splits)."""
    root = cfg.data.root
    if not storage_paths.is_dir(root):
        raise DataFormatError(root, "data root not found (set --data-root; `raycv data make-demo` writes the demo "
                                    "datasets, `raycv data download NAME` the real ones)")
    for split in ("train", "val"):
        index = task.index(split, cfg)
        if index.empty:
            raise DataFormatError(root, f"split {split!r} of {task.name} has no samples")
        _check_labels(task, cfg, split, index)


def _check_labels(task: Task, cfg: TaskConfig, split: str, index: pd.DataFrame) -> None:
    class_names = getattr(task, "class_names", None)
    if class_names is None or "label" not in index.columns or not pd.api.types.is_integer_dtype(index["label"]):
        return
    names = class_names(cfg)
    top = int(index["label"].max())
    if top >= len(names):
        raise DataFormatError(cfg.data.root, f"split {split!r} has {top + 1} classes but the model is built "
                                                   f"for {len(names)} ({', '.join(map(str, names))}): the splits' "
                                                   "class lists differ")


def preflight(cfg: TaskConfig, tracking_uri: str) -> None:
    """Every check of a Ray Train run that needs no Ray: ``raycv train`` / ``tune`` run it before starting Ray."""
    check_config(cfg)
    check_data(get_task(cfg.task), with_absolute_data_root(cfg))
    check_weights(cfg, tracking_uri)


def scaling_config(cfg: TaskConfig, held_cpus: float = 0.0) -> ScalingConfig:
    scaling = cfg.scaling
    cpus = worker_cpus(scaling.cpus_per_worker, scaling.workers, float(ray.cluster_resources().get("CPU", 0.0)),
                       held_cpus)
    resources: dict[str, float] = {"CPU": cpus, **scaling.worker_resources}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    return ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0,
                         resources_per_worker=resources)


def _open_run(
    client: MlflowClient, cfg: TaskConfig, resume: str | None, storage: str, parent_run_id: str | None,
    run_tags: dict[str, str] | None, run_name: str | None,
) -> tuple[str, str]:
    """(run_id, Ray Train run name): a new MLflow run, or the one being resumed."""
    task = cfg.task
    if resume is None:
        tags = {"raycv.kind": "train", "raycv.metric": get_task(task).metric, **(run_tags or {})}
        workers = cfg.scaling.workers
        run_id = tracking.create_run(client, task, cfg, run_name=run_name or tracking.run_name(task, f"{workers}w"),
                                     tags=tags, parent_run_id=parent_run_id)
        name = f"{task}-{run_id[:12]}"
        tracking.set_tags(client, run_id, {"raycv.train_name": name, "raycv.storage": storage})
        return run_id, name
    run_id = resume_run_id(client, task, resume)
    run = client.get_run(run_id)
    name = run.data.tags.get("raycv.train_name")
    if not name:
        raise ValueError(f"--resume: MLflow run {run_id} is not a raycv training run")
    client.update_run(run_id, status="RUNNING")
    return run_id, name


def _describe_inputs(client: MlflowClient, run_id: str, task: Task, cfg: TaskConfig, splits: dict[str, Any]) -> None:
    """The run's dataset splits as MLflow inputs and a one-paragraph description of what the run does."""
    name, folder = dataset_of(task, cfg)
    source = storage_paths.join(cfg.data.root, folder)
    for split, data in splits.items():
        tracking.log_dataset(client, run_id, name, source, split, data.digest, data.rows, data.skipped)
    tracking.describe_run(client, run_id, (
        f"raycv train {task.name}: {cfg.train.epochs} epochs on {name} ({splits['train'].rows} train / "
        f"{splits['val'].rows} val samples from {source}), {cfg.scaling.workers} Ray Train worker(s). Headline "
        f"metric: {task.metric} (per epoch; the runs table sorts by its latest value). Everything else: the params "
        f"(the whole config, also as config.yaml), plots/ and metrics/; the model is model/state_dict.pt."))


def dataset_of(task: Task, cfg: TaskConfig) -> tuple[str, str]:
    """(name, top folder under ``data.root``) of the dataset a run reads: the one the task declares, or the folder
    ``data.dataset`` names where the task reads another dataset of its layout (hotdog-source)."""
    folder = getattr(cfg.data, "dataset", None)
    for dataset in task.datasets:
        if folder in (None, dataset.folder):
            return dataset.name, dataset.folder
    return (folder, folder) if folder else (task.name, "")


def resume_run_id(client: MlflowClient, task: str, resume: str) -> str:
    """The run ``--resume`` continues: ``resume`` itself, or for "latest" the newest training run of ``task`` that
    did not finish."""
    if resume != "latest":
        return resume
    run_id = tracking.find_latest_run(client, task)
    if run_id is not None:
        return run_id
    newest = tracking.find_latest_run(client, task, unfinished=False)
    if newest is None:
        raise ConfigError(f"--resume: no earlier {task} training run in {client.tracking_uri}")
    status = client.get_run(newest).info.status
    raise ConfigError(f"--resume: nothing to resume: the newest {task} run {newest} is {status} and no unfinished "
                      f"one exists (train anew without --resume, or pass --resume RUN_ID to continue a run)")


def _status_after(error: BaseException) -> str:
    """MLflow status of a run ``trainer.fit`` left with ``error``: KILLED where it was stopped, by a stop signal
    (:mod:`pipelines.interrupts`) or by Tune, which stops a trial (ASHA) by raising ``SystemExit(0)`` in it; else
    FAILED."""
    stopped = isinstance(error, (RunInterrupted, KeyboardInterrupt)) or (isinstance(error, SystemExit)
                                                                          and not error.code)
    return "KILLED" if stopped else "FAILED"


def _interrupted_message(client: MlflowClient, run_id: str, task: Task, cfg: TaskConfig,
                         error: RunInterrupted) -> str:
    """What the CLI prints for a run a stop signal ended: after how many epochs, and where it is."""
    done = len(client.get_metric_history(run_id, task.metric))
    kept = " and its checkpoints are kept" if done else ""
    return f"{error} after {done} of {cfg.train.epochs} epochs: MLflow run {run_id} is marked KILLED{kept}"


def _raise_original_data_errors() -> None:
    """Ray Data pipelines built from now on raise a task's own error (e.g. a DataFormatError naming the file).

    By default Ray Data raises ``UserCodeException`` from it, and that chain is lost when the error is pickled on its
    way to the Train worker: the worker could no longer tell a corrupt sample (not retried) from a crash.
    """
    ray.data.DataContext.get_current().raise_original_map_exception = True


def _record_failure(client: MlflowClient, run_id: str, error: BaseException) -> None:
    """End the MLflow run FAILED (KILLED when Tune stopped it) with its error's one line as tag ``raycv.error``."""
    status = _status_after(error)
    if status == "FAILED":
        tracking.set_tags(client, run_id, {ERROR_TAG: failures.one_line(error)})
    client.set_terminated(run_id, status=status)


def run_training(
    cfg: TaskConfig, tracking_uri: str, resume: str | None = None, storage: str | None = None, *,
    run_tags: dict[str, str] | None = None, parent_run_id: str | None = None, callbacks: list | None = None,
    held_cpus: float = 0.0, weights: ResolvedWeights | None = None, register_alias: str | None = None,
    run_name: str | None = None, concurrent_runs: int = 1, stop_signals: bool = False,
) -> TrainOutcome:
    """Train ``cfg.task`` with Ray Train and track it in MLflow.

    ``resume``: a run id or "latest" to continue from its last checkpoint. ``parent_run_id`` nests the new run
    (sweeps); ``callbacks`` are Ray Train callbacks (Tune's ``TuneReportCallback`` inside a sweep trial);
    ``held_cpus``: CPUs the processes driving this run hold besides its workers (a sweep's trial functions);
    ``weights``: ``model.weights`` already read by a sweep's driver (else read here); ``register_alias``: register
    the finished run's model as a new version of ``raycv-<task>`` and point this alias at it; ``run_name``: the
    new run's name in MLflow (default: task, workers and the date); ``concurrent_runs``: runs that may start beside
    this one (a sweep's concurrent trials), which share the object store's room to cache decoded splits;
    ``stop_signals``: Ctrl-C and SIGTERM end the run at once with :class:`pipelines.interrupts.RunInterrupted`, for
    a process that exits after the run (``raycv train``, ``raycv demo``; see :func:`pipelines.interrupts.fit_run`),
    from the data pipelines on: a ``ray job stop`` while the splits are built marks the run KILLED too (Ray's
    own SIGTERM handler would exit 15 and leave it FAILED).
    """
    started = time.perf_counter()
    task = get_task(cfg.task)
    check_config(cfg)
    # Read and checked here, once: workers get it from the object store.
    weights = weights or put_weights(cfg, tracking_uri)
    cfg = task.resolve_for_workers(with_absolute_data_root(cfg))
    client = MlflowClient(tracking_uri)
    storage = storage or default_storage()
    run_id, name = _open_run(client, cfg, resume, storage, parent_run_id, run_tags, run_name)
    if resume:
        storage = client.get_run(run_id).data.tags.get("raycv.storage", storage)
    experiment_id = client.get_run(run_id).info.experiment_id
    log.info("MLflow: %s", tracking.run_url(tracking_uri, experiment_id, run_id))
    phases = {"weights and MLflow run": time.perf_counter() - started}
    try:
        with stop_signals_raise() if stop_signals else contextlib.nullcontext():  # from the splits on
            _raise_original_data_errors()
            train = build_split(task, cfg, "train", train=True, concurrent_runs=concurrent_runs)
            val = build_split(task, cfg, "val", train=False, concurrent_runs=concurrent_runs)
            if not resume:
                _describe_inputs(client, run_id, task, cfg, {"train": train, "val": val})
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"cfg": cfg, "task": task_path(task), "tracking_uri": tracking_uri, "run_id": run_id,
                                   "weights": weights,
                                   "train_rows": train.rows, "verbose": logs.verbose(),
                                   "progress": console_style()},
                scaling_config=scaling_config(cfg, held_cpus),
                run_config=RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                    callbacks=[*(callbacks or []), FailFastCallback()],
                    logging_config=LoggingConfig(log_level=logs.ray_log_level()),
                ),
                datasets={"train": train.dataset, "val": val.dataset},
                dataset_config=DataConfig(datasets_to_split=[] if workers_read_whole_splits(cfg) else "all"),
            )
            phases["data pipelines"] = time.perf_counter() - started - sum(phases.values())
            fit_started = time.time()
            logs.quiet_train_environment()
            result = fit_run(trainer.fit, stop_signals)
            phases.update(_fit_phases(client, run_id, fit_started, time.time()))
    except BaseException as error:
        _record_failure(client, run_id, error)
        if isinstance(error, RunInterrupted):
            raise RunInterrupted(error.signal_number, _interrupted_message(client, run_id, task, cfg, error),
                                 resume=run_id) from None
        cause = failures.deterministic_cause(error)
        if cause is not None and cause is not error:
            raise failures.DeterministicError(failures.one_line(cause)) from error
        if isinstance(error, TrainingFailedError):
            raise failures.RunError(f"training failed after train.max_failures={cfg.train.max_failures} "
                                    f"retries: {failures.one_line(error)}") from error
        raise
    wall = time.perf_counter() - started
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[tracking.Metric("wall_seconds", wall, now, 0)] + [
        tracking.Metric(f"seconds_{name.replace(' ', '_')}", value, now, 0) for name, value in phases.items()])
    client.set_terminated(run_id, status="FINISHED")
    registered = time.perf_counter()
    version = _register(client, cfg.task, run_id, register_alias)
    if version:
        phases["model registry"] = time.perf_counter() - registered
    return TrainOutcome(run_id=run_id, experiment_id=experiment_id, metrics=dict(result.metrics or {}),
                        wall_seconds=wall, registered_version=version, phases=phases)


def _fit_phases(client: MlflowClient, run_id: str, started: float, ended: float) -> dict[str, float]:
    """Ray Train's share of a run: its worker group's start until rank 0's first training batch, then training
    (with evaluation and model logging); one "training" phase when the run was resumed (no first step then)."""
    first = client.get_run(run_id).data.tags.get(FIRST_STEP_TAG)
    if first is None or not started <= float(first) <= ended:
        return {"training": ended - started}
    return {"worker group to first step": float(first) - started, "training": ended - float(first)}


def _register(client: MlflowClient, task: str, run_id: str, alias: str | None) -> str | None:
    """Register the finished run's model under ``alias``; a registry that refuses (a file store has none) is
    logged, not raised: the run and its model are complete either way."""
    if alias is None:
        return None
    try:
        version = tracking.register_model(client, task, run_id, alias)
    except mlflow.exceptions.MlflowException as exc:
        log.warning("the model of run %s was not registered as %s@%s: %s", run_id, tracking.registered_name(task),
                    alias, exc.message)
        return None
    log.info("registered as %s version %s (alias %s)", tracking.registered_name(task), version, alias)
    return version
