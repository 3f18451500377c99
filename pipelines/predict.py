"""``raycv predict``: rebuild a model trained by a raycv run and apply it to image files.

The model URI may be ``runs:/<run_id>/model``, ``models:/raycv-<task>@best`` or ``models:/raycv-<task>/<version>``
(the registry). It names a run; that run's ``config.yaml`` (image sizes, normalisation, model shape) rebuilds the
model with the task's ``build_model``, its tensor-only ``model/state_dict.pt`` fills it (read with
``weights_only=True``: nothing in the artifact is executed) and a classifier's ``model/class_names.json`` names its
classes, so prediction preprocesses exactly as validation did and needs neither the training data nor a pickle.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn

from cvtasks import storage
from cvtasks.models.weights import SCRATCH
from cvtasks.settings import TaskConfig
from cvtasks.tasks import get_task
from cvtasks.tasks.base import Task
from pipelines import tracking
from pipelines.config import typed

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config.yaml"


def training_config(client: MlflowClient, run_id: str) -> dict:
    """The resolved config run ``run_id`` was trained with."""
    path = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT))
    return yaml.safe_load(path.read_text())


def rebuild_config(raw: dict, class_names: list[str] | None) -> TaskConfig:
    """The logged config ``raw`` for rebuilding its trained model: no pretrained weights looked up (they are
    overwritten anyway) and the logged class names instead of the training data's folders."""
    raw = copy.deepcopy(raw)
    if "weights" in raw.get("model", {}):
        raw["model"]["weights"] = SCRATCH
    if class_names is not None:
        raw["data"]["class_names"] = class_names
    return typed(raw["task"], raw)


def load_logged_model(task_name: str, model_uri: str, tracking_uri: str) -> tuple[nn.Module, TaskConfig]:
    """(the model ``model_uri`` names in eval mode, the config to predict with) for task ``task_name``."""
    client = MlflowClient(tracking_uri)
    run_id = tracking.model_run_id(client, model_uri)
    cfg = training_config(client, run_id)
    if cfg.get("task") != task_name:
        raise ValueError(f"{model_uri} was trained for task {cfg.get('task')!r}, not {task_name!r}")
    state_dict = tracking.load_model_state(client, run_id)
    cfg = rebuild_config(cfg, tracking.load_class_names(client, run_id))
    model = get_task(task_name).build_model(cfg)
    model.load_state_dict(state_dict)
    return model.eval(), cfg


def predict(task_name: str, model_uri: str, images: list[str], out_dir: str | Path, tracking_uri: str) -> list[Path]:
    """Write the task's predictions for ``images`` under ``out_dir``; returns the files written."""
    if not isinstance(get_task(task_name), Task):
        raise ValueError(f"{task_name} trains no model to apply (runner {get_task(task_name).runner}); its runs "
                         "write their results themselves")
    missing = [p for p in images if not storage.exists(p)]  # local files or storage URIs (s3://...)
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    model, cfg = load_logged_model(task_name, model_uri, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d image(s) with %s", len(images), model_uri)
    with torch.no_grad():
        return get_task(task_name).predict_files(model, images, out, cfg)
