"""MLflow tracking for raycv: experiments, runs that survive restarts, per-epoch metrics logged exactly once.

The driver creates (or, on resume, reopens) one run per training; rank 0 of the Ray Train workers logs into it by
id. After a worker failure or ``--resume`` the training restarts from its last Ray Train checkpoint, whose metric
history is replayed into MLflow for any epoch MLflow does not have yet, so every epoch is logged once at
``step = epoch`` in the same run.

A trained model is logged as tensors only (``model/state_dict.pt``), never as a pickled MLflow model: whoever reads
it back rebuilds the model from the run's ``config.yaml`` and loads the weights with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models import Model, infer_signature
from mlflow.models.utils import _save_example  # MLflow's own input-example writer (log_model uses it)
from mlflow.tracking import MlflowClient
from PIL import Image

from cvtasks.errors import DataFormatError
from cvtasks.models.weights import load_state_dict_file
from cvtasks.settings import TaskConfig
from pipelines.config import flatten

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "raycv-"
#: Without this tag MLflow 3's UI opens an experiment in its GenAI view instead of the runs table and charts.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
#: The metric logged every epoch; its history tells which epochs a run already has.
EPOCH_KEY = "epoch"
#: A run's model: ``model/state_dict.pt`` (tensors only) and, for classifiers, ``model/class_names.json``.
MODEL_DIR = "model"
#: Registry aliases: every ``raycv train`` moves ``latest`` to its model, a sweep moves ``best`` to its winner.
#: MLflow reserves the name ``latest``: ``models:/<name>@latest`` is always the newest version, so registering a
#: version is all it takes to move it.
LATEST_ALIAS = "latest"
BEST_ALIAS = "best"
STATE_DICT_FILE = "state_dict.pt"
CLASS_NAMES_FILE = "class_names.json"
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
    cfg: TaskConfig,
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
    log_params(client, run_id, {k: v for k, v in cfg.raw.items() if k != "search"})
    client.log_dict(run_id, cfg.raw, "config.yaml")
    return run_id


def run_name(task: str, what: str) -> str:
    """A run's name in the MLflow UI, saying what ran and when: ``cifar10-2w-1202-0042``, ``hotdog-sweep-...``."""
    return f"{task}-{what}-{time.strftime('%m%d-%H%M')}"


def describe_run(client: MlflowClient, run_id: str, text: str) -> None:
    """The run's description (MLflow's note, shown at the top of the run's page)."""
    client.set_tag(run_id, "mlflow.note.content", text)


def log_dataset(client: MlflowClient, run_id: str, name: str, source: str, split: str, digest: str,
                rows: int, skipped: int | None) -> None:
    """One split of the run's input dataset, shown in the runs table's Dataset column and on the run's page.

    ``digest`` identifies the split's index (files and labels), so runs that read the same data show the same one.
    """
    profile = {"num_rows": rows, **({"skipped_rows": skipped} if skipped is not None else {})}
    dataset = Dataset(name=name, digest=digest, source_type="s3" if source.startswith("s3://") else "local",
                      source=json.dumps({"uri": source}), profile=json.dumps(profile))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)])])


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


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at a run: its UI address for a server, or the ``mlflow ui`` command for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {tracking_uri} (browse: mlflow ui --backend-store-uri {tracking_uri})"


def find_latest_run(client: MlflowClient, task: str, unfinished: bool = True) -> str | None:
    """The most recent training run of ``task`` that did not finish (``--resume`` without a run id), or with
    ``unfinished=False`` the most recent one whatever its status."""
    experiment = client.get_experiment_by_name(experiment_name(task))
    if experiment is None:
        return None
    status = " and attributes.status != 'FINISHED'" if unfinished else ""
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`raycv.kind` = 'train'{status}",
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


def log_model_state(client: MlflowClient, run_id: str, state_dict: dict[str, torch.Tensor],
                    class_names: list[str] | None, example: np.ndarray | None = None,
                    output: np.ndarray | None = None) -> None:
    """Log a trained model as tensors only: ``model/state_dict.pt`` (``torch.save`` of the state dict) and, for
    classifiers, ``model/class_names.json``; with the run's ``config.yaml`` the task's ``build_model`` rebuilds it
    on any machine, without its training data.

    With an ``example`` model input (and the model's ``output`` for it, where that is one array) the folder also
    gets an ``MLmodel`` file holding MLflow's signature of the model's tensors and the input example, which the
    MLflow UI shows with the model. It declares no flavor: nothing loads a pickled model from it.
    """
    with tempfile.TemporaryDirectory(prefix="raycv-model-") as directory:
        folder = Path(directory) / MODEL_DIR
        folder.mkdir()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, folder / STATE_DICT_FILE)
        if class_names is not None:
            (folder / CLASS_NAMES_FILE).write_text(json.dumps(class_names))
        if example is not None:
            _write_mlmodel(folder, run_id, example, output)
        client.log_artifacts(run_id, str(folder), MODEL_DIR)


def _write_mlmodel(folder: Path, run_id: str, example: np.ndarray, output: np.ndarray | None) -> None:
    model = Model(artifact_path=MODEL_DIR, run_id=run_id, signature=infer_signature(example, output),
                  metadata={"raycv": "tensor-only state_dict.pt; rebuild with the task's build_model (raycv predict)"})
    _save_example(model, example, str(folder))
    model.save(str(folder / "MLmodel"))


def model_run_id(client: MlflowClient, model_uri: str) -> str:
    """The run that logged the model ``runs:/<run id>/model``, ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` names (a registered version's run)."""
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri[len("runs:/"):].partition("/")
        if run_id and path.strip("/") == MODEL_DIR:
            return run_id
    elif model_uri.startswith("models:/"):
        name, at, alias = model_uri[len("models:/"):].partition("@")
        if not at:
            name, _, version = name.partition("/")
        try:
            found = client.get_model_version_by_alias(name, alias) if at else \
                client.get_model_version(name, version) if version.isdigit() else None
        except mlflow.exceptions.MlflowException as exc:
            raise ValueError(f"{model_uri}: {exc.message}") from None
        if found is not None and found.run_id:
            return found.run_id
    raise ValueError(f"{model_uri}: expected runs:/<run id>/{MODEL_DIR}, models:/<name>@<alias> or "
                     "models:/<name>/<version> of a model logged by a raycv run")


def _download(client: MlflowClient, run_id: str, path: str, directory: str) -> Path:
    """A run's artifact ``path`` in ``directory``; a missing one raises ``FileNotFoundError`` naming it."""
    try:
        return Path(client.download_artifacts(run_id, path, directory))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise FileNotFoundError(f"runs:/{run_id}/{path}: cannot read this artifact ({exc})") from None


def load_model_state(client: MlflowClient, run_id: str) -> dict[str, torch.Tensor]:
    """The state dict run ``run_id`` logged, read tensor-only; anything else in its place (a pickle that would run
    code) raises ``DataFormatError`` naming the artifact and is never executed."""
    artifact = f"{MODEL_DIR}/{STATE_DICT_FILE}"
    with tempfile.TemporaryDirectory(prefix="raycv-model-") as directory:
        local = _download(client, run_id, artifact, directory)
        try:
            return load_state_dict_file(str(local))
        except DataFormatError as exc:
            raise DataFormatError(f"runs:/{run_id}/{artifact}", exc.problem) from None


def load_class_names(client: MlflowClient, run_id: str) -> list[str] | None:
    """The class names a classifier's run logged beside its weights; None for other tasks."""
    if CLASS_NAMES_FILE not in {Path(a.path).name for a in client.list_artifacts(run_id, MODEL_DIR)}:
        return None
    with tempfile.TemporaryDirectory(prefix="raycv-model-") as directory:
        names = json.loads(_download(client, run_id, f"{MODEL_DIR}/{CLASS_NAMES_FILE}", directory).read_text())
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataFormatError(f"runs:/{run_id}/{MODEL_DIR}/{CLASS_NAMES_FILE}", "expected a JSON list of names")
    return names


def registered_name(task: str) -> str:
    """The Model Registry name of ``task``'s models."""
    return f"{EXPERIMENT_PREFIX}{task}"


def register_model(client: MlflowClient, task: str, run_id: str, alias: str) -> str:
    """Register run ``run_id``'s model folder (its tensor-only weights) as a new version of ``raycv-<task>`` and
    point ``alias`` at it; returns the version."""
    name = registered_name(task)
    if STATE_DICT_FILE not in {Path(a.path).name for a in client.list_artifacts(run_id, MODEL_DIR)}:
        raise ValueError(f"run {run_id} logged no model to register")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, tags={"raycv.task": task})
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags={"raycv.task": task})
    if alias != LATEST_ALIAS:  # reserved by MLflow, which resolves it to this newest version by itself
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def alias_metric(client: MlflowClient, task: str, alias: str, metric: str) -> float | None:
    """The last value of ``metric`` in the run behind ``models:/raycv-<task>@<alias>``; None when the alias (or
    the metric) does not exist."""
    try:
        run_id = client.get_model_version_by_alias(registered_name(task), alias).run_id
    except mlflow.exceptions.MlflowException:
        return None
    value = client.get_run(run_id).data.metrics.get(metric) if run_id else None
    return None if value is None else float(value)
