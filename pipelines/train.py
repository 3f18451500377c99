"""The driver side of one training run: MLflow run, Ray Data pipelines, a Ray Train ``TorchTrainer``."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cvtasks import storage as storage_paths
from cvtasks.tasks import get_task
from pipelines import tracking
from pipelines.data import build_split
from pipelines.loop import train_loop_per_worker

log = logging.getLogger(__name__)

#: Checkpoints kept per run: the newest two, enough to resume after a failure while a new one is being written.
CHECKPOINTS_KEPT = 2


@dataclass
class TrainOutcome:
    run_id: str
    experiment_id: str
    metrics: dict[str, Any]
    wall_seconds: float


def default_storage() -> str:
    """Where Ray Train keeps checkpoints: ``RAYCV_STORAGE`` (shared storage on a cluster) or ./ray_results."""
    return os.environ.get("RAYCV_STORAGE") or str(Path("ray_results").resolve())


def with_absolute_data_root(cfg: dict) -> dict:
    """``cfg`` with a local ``data.root`` made absolute: Ray workers and Tune trials run in other folders."""
    return {**cfg, "data": {**cfg["data"], "root": storage_paths.absolute(str(cfg["data"]["root"]))}}


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


@contextmanager
def _sigint_handler_restored() -> Iterator[None]:
    """Put back the SIGINT handler that ``TorchTrainer.fit`` replaces on the main thread.

    Ray Train's handler (Ctrl-C aborts the run) closes over the run's controller actor handle, so left installed it
    keeps that controller alive for as long as a long-lived process (a notebook, a test session) runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def scaling_config(cfg: dict, held_cpus: float = 0.0) -> ScalingConfig:
    scaling = cfg["scaling"]
    gpus = float(scaling["gpus_per_worker"])
    cpus = worker_cpus(float(scaling["cpus_per_worker"]), int(scaling["workers"]),
                       float(ray.cluster_resources().get("CPU", 0.0)), held_cpus)
    resources: dict[str, float] = {"CPU": cpus}
    if gpus:
        resources["GPU"] = gpus
    return ScalingConfig(num_workers=int(scaling["workers"]), use_gpu=gpus > 0, resources_per_worker=resources)


def _open_run(
    client: MlflowClient, cfg: dict, resume: str | None, storage: str, parent_run_id: str | None,
    run_tags: dict[str, str] | None,
) -> tuple[str, str]:
    """(run_id, Ray Train run name): a new MLflow run, or the one being resumed."""
    task = cfg["task"]
    if resume is None:
        tags = {"raycv.kind": "train", **(run_tags or {})}
        run_id = tracking.create_run(client, task, cfg, tags=tags, parent_run_id=parent_run_id)
        name = f"{task}-{run_id[:12]}"
        tracking.set_tags(client, run_id, {"raycv.train_name": name, "raycv.storage": storage})
        return run_id, name
    run_id = tracking.find_latest_run(client, task) if resume == "latest" else resume
    if run_id is None:
        raise ValueError(f"--resume: no earlier {task} training run in {client.tracking_uri}")
    run = client.get_run(run_id)
    name = run.data.tags.get("raycv.train_name")
    if not name:
        raise ValueError(f"--resume: MLflow run {run_id} is not a raycv training run")
    client.update_run(run_id, status="RUNNING")
    return run_id, name


def _status_after(error: BaseException) -> str:
    """MLflow status of a run ``trainer.fit`` left with ``error``: Tune stops a trial (ASHA) by raising
    ``SystemExit(0)`` in it, which ends the run KILLED, not FAILED."""
    return "KILLED" if isinstance(error, SystemExit) and not error.code else "FAILED"


def run_training(
    cfg: dict, tracking_uri: str, resume: str | None = None, storage: str | None = None, *,
    run_tags: dict[str, str] | None = None, parent_run_id: str | None = None, callbacks: list | None = None,
    held_cpus: float = 0.0,
) -> TrainOutcome:
    """Train ``cfg["task"]`` with Ray Train and track it in MLflow.

    ``resume``: a run id or "latest" to continue from its last checkpoint. ``parent_run_id`` nests the new run
    (sweeps); ``callbacks`` are Ray Train callbacks (Tune's ``TuneReportCallback`` inside a sweep trial);
    ``held_cpus``: CPUs the processes driving this run hold besides its workers (a sweep's trial functions).
    """
    started = time.perf_counter()
    task = get_task(cfg["task"])
    cfg = with_absolute_data_root(cfg)
    client = MlflowClient(tracking_uri)
    storage = storage or default_storage()
    run_id, name = _open_run(client, cfg, resume, storage, parent_run_id, run_tags)
    if resume:
        storage = client.get_run(run_id).data.tags.get("raycv.storage", storage)
    experiment_id = client.get_run(run_id).info.experiment_id
    log.info("MLflow: %s", tracking.run_url(tracking_uri, experiment_id, run_id))
    try:
        train = build_split(task, cfg, "train", train=True)
        val = build_split(task, cfg, "val", train=False)
        data_stats = {"data_train_rows": train.rows, "data_val_rows": val.rows}
        for split, data in (("train", train), ("val", val)):
            if data.skipped is not None:
                data_stats[f"data_{split}_skipped"] = data.skipped
        client.log_batch(run_id, metrics=[tracking.Metric(k, float(v), int(time.time() * 1000), 0)
                                          for k, v in data_stats.items()])
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg, "tracking_uri": tracking_uri, "run_id": run_id},
            scaling_config=scaling_config(cfg, held_cpus),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=int(cfg["train"]["max_failures"])),
                checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                callbacks=callbacks,
            ),
            datasets={"train": train.dataset, "val": val.dataset},
            dataset_config=DataConfig(datasets_to_split="all"),
        )
        with _sigint_handler_restored():
            result = trainer.fit()
    except BaseException as error:
        client.set_terminated(run_id, status=_status_after(error))
        raise
    wall = time.perf_counter() - started
    client.log_metric(run_id, "wall_seconds", wall)
    client.set_terminated(run_id, status="FINISHED")
    return TrainOutcome(run_id=run_id, experiment_id=experiment_id, metrics=dict(result.metrics or {}),
                        wall_seconds=wall)
