"""``raycv predict``: load a model logged by a raycv run and apply it to image files.

The model URI may be ``runs:/<run_id>/model``, ``models:/raycv-<task>@best`` (the registry) or a logged-model
URI; the config it was trained with (image sizes, normalisation, class names) is read back from that run's
``config.yaml`` so prediction preprocesses exactly as validation did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import torch
import yaml
from mlflow.tracking import MlflowClient

from cvtasks.tasks import get_task

log = logging.getLogger(__name__)


def training_config(model_uri: str, tracking_uri: str) -> dict:
    """The resolved config of the run that logged ``model_uri``."""
    mlflow.set_tracking_uri(tracking_uri)
    run_id = mlflow.models.get_model_info(model_uri).run_id
    if not run_id:
        raise ValueError(f"{model_uri}: this model was not logged by a run, so raycv cannot find its config")
    path = MlflowClient(tracking_uri).download_artifacts(run_id, "config.yaml")
    return yaml.safe_load(Path(path).read_text())


def predict(task_name: str, model_uri: str, images: list[str], out_dir: str | Path, tracking_uri: str) -> list[Path]:
    """Write the task's predictions for ``images`` under ``out_dir``; returns the files written."""
    cfg = training_config(model_uri, tracking_uri)
    if cfg.get("task") != task_name:
        raise ValueError(f"{model_uri} was trained for task {cfg.get('task')!r}, not {task_name!r}")
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d image(s) with %s", len(images), model_uri)
    with torch.no_grad():
        return get_task(task_name).predict_files(model, images, out, cfg)
