"""MLflow tracking for raycv: experiments, runs that survive restarts, per-epoch metrics logged exactly once.

The driver creates (or, on resume, reopens) one run per training; rank 0 of the Ray Train workers logs into it by
id. After a worker failure or ``--resume`` the training restarts from its last Ray Train checkpoint, whose metric
history is replayed into MLflow for any epoch MLflow does not have yet, so every epoch is logged once at
``step = epoch`` in the same run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.config import flatten

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "raycv-"
#: Without this tag MLflow 3's UI opens an experiment in its GenAI view instead of the runs table and charts.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
#: The metric logged every epoch; its history tells which epochs a run already has.
EPOCH_KEY = "epoch"
_MLFLOW_BATCH = 100  # MLflow accepts at most this many params per log_batch call
_PARAM_MAX_CHARS = 6000


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store ``./mlflow.db`` in the working folder.

    Local paths are made absolute so Ray workers in other working directories write to the same store.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    return uri


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store live in ``mlartifacts/`` beside the database file."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (and tagged for the classic UI) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG[0]) != EXPERIMENT_KIND_TAG[1]:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND_TAG)
        return experiment.experiment_id
    root = _local_artifact_root(client.tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND_TAG]))
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def experiment_name(task: str) -> str:
    return f"{EXPERIMENT_PREFIX}{task}"


def log_params(client: MlflowClient, run_id: str, cfg: dict) -> None:
    """Log the whole flattened config as params (long values truncated to MLflow's limit)."""
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flatten(cfg).items()]
    params = [Param(p.key, p.value[:_PARAM_MAX_CHARS]) for p in params]
    for i in range(0, len(params), _MLFLOW_BATCH):
        client.log_batch(run_id, params=params[i : i + _MLFLOW_BATCH])


def create_run(
    client: MlflowClient,
    task: str,
    cfg: dict,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run in the task's experiment with the flattened config as params and the resolved config file."""
    experiment_id = ensure_experiment(client, experiment_name(task))
    all_tags = {"raycv.task": task, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    log_params(client, run_id, {k: v for k, v in cfg.items() if k != "search"})
    client.log_dict(run_id, cfg, "config.yaml")
    return run_id


def logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    return {int(m.step) for m in client.get_metric_history(run_id, EPOCH_KEY)}


def log_epoch(client: MlflowClient, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    """Log one epoch's metrics at ``step=epoch`` (plus the ``epoch`` marker) in one batch."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != EPOCH_KEY]
    batch.append(Metric(EPOCH_KEY, float(epoch), now, epoch))
    client.log_batch(run_id, metrics=batch)


def replay_history(client: MlflowClient, run_id: str, history: list[dict[str, float]]) -> set[int]:
    """Log the epochs of a checkpoint's metric history that MLflow lacks; returns the epochs the run now has."""
    have = logged_epochs(client, run_id)
    missing = [entry for entry in history if int(entry[EPOCH_KEY]) not in have]
    for entry in missing:
        log_epoch(client, run_id, int(entry[EPOCH_KEY]), entry)
    if missing:
        log.info("replayed %d checkpointed epoch(s) missing from MLflow run %s", len(missing), run_id)
    return have | {int(entry[EPOCH_KEY]) for entry in missing}


def log_image(client: MlflowClient, run_id: str, image: Image.Image, path: str) -> None:
    client.log_image(run_id, image, artifact_file=path)


def log_artifact_value(client: MlflowClient, run_id: str, name: str, value: Any) -> None:
    """Log a task's extra artifact: PIL image, dict (JSON) or text."""
    if isinstance(value, Image.Image):
        client.log_image(run_id, value, artifact_file=name)
    elif isinstance(value, dict):
        client.log_dict(run_id, value, name)
    else:
        client.log_text(run_id, str(value), name)


def figure_png(fig: Any) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at a run: its UI address for a server, or the ``mlflow ui`` command for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {tracking_uri} (browse: mlflow ui --backend-store-uri {tracking_uri})"


def find_latest_run(client: MlflowClient, task: str) -> str | None:
    """The most recent training run of ``task`` (for ``--resume`` without a run id)."""
    experiment = client.get_experiment_by_name(experiment_name(task))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`raycv.kind` = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def find_child_run(client: MlflowClient, parent_run_id: str, trial_id: str) -> str | None:
    """The child run of sweep ``parent_run_id`` that belongs to Tune trial ``trial_id``, if any."""
    for run in child_runs(client, parent_run_id):
        if run.data.tags.get("raycv.trial_id") == trial_id:
            return run.info.run_id
    return None


def find_sweep_run(client: MlflowClient, task: str, sweep_path: str) -> str | None:
    experiment = client.get_experiment_by_name(experiment_name(task))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`raycv.sweep_path` = '{sweep_path}'", max_results=1)
    return runs[0].info.run_id if runs else None


@contextmanager
def _default_tracking_uri(uri: str) -> Iterator[None]:
    """Make ``uri`` MLflow's process-wide tracking URI inside the block.

    MLflow's SQL model registry looks a ``models:/m-...`` source up through a default ``MlflowClient()``, not the
    client registering it: with any other default (``--tracking-uri`` naming another store) it reports the model
    as not found.
    """
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def register_best_model(client: MlflowClient, task: str, run_id: str, alias: str) -> str:
    """Register run ``run_id``'s model as a new version of ``raycv-<task>`` and point ``alias`` at it."""
    name = f"{EXPERIMENT_PREFIX}{task}"
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, tags={"raycv.task": task})
    models = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    if not models:
        raise ValueError(f"run {run_id} logged no model to register")
    # MLflow 3 registers a LoggedModel by its id; its models:/m-... URI is the version's source.
    with _default_tracking_uri(client.tracking_uri):
        version = client.create_model_version(name, source=models[0].model_uri, run_id=run_id,
                                              model_id=models[0].model_id, tags={"raycv.task": task})
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
