"""``model.weights``, resolved once on the driver and shipped to the Ray Train workers through the object store.

The driver turns the spec (``imagenet`` from its local torch hub cache, a file path or ``s3://`` URI, or the MLflow
model URI of an earlier raycv run: ``runs:/<run id>/model``, ``models:/raycv-<task>@<alias>`` or
``models:/raycv-<task>/<version>``) into a tensor-only state dict. A missing, unreadable or malicious weights file
therefore fails in one line before any worker starts, and workers never open a path that exists only on the
driver's disk, nor need the hub cache or the tracking server.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import ray
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torchvision.models import ResNet18_Weights

from cvtasks.models import weights
from cvtasks.tasks.base import Config, Task
from pipelines import tracking
from pipelines.handoff import ResolvedWeights

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("runs:/", "models:/")


def resolve_state_dict(spec: str, tracking_uri: str) -> tuple[weights.StateDict | None, str]:
    """(state dict or None for ``scratch``, a one-line description of its origin) for a ``model.weights`` spec.

    Every ``model.weights`` task (hotdog, voc) has a torchvision ResNet-18 backbone, hence its ``imagenet`` entry.
    """
    if not spec.startswith(MLFLOW_SCHEMES):
        return weights.resolve_state_dict(spec, ResNet18_Weights)
    client = MlflowClient(tracking_uri)
    run_id = tracking.model_run_id(client, spec)
    return tracking.load_model_state(client, run_id), spec if spec.startswith("runs:/") else f"{spec} (run {run_id})"


def check_weights(cfg: Config, tracking_uri: str) -> None:
    """Driver side, before Ray starts: ``model.weights`` names something that exists (nothing is loaded yet)."""
    spec = cfg.get("model", {}).get("weights")
    if not isinstance(spec, str):
        return
    if spec.startswith(MLFLOW_SCHEMES):
        client = MlflowClient(tracking_uri)
        run_id = tracking.model_run_id(client, spec)
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise ValueError(f"model.weights {spec}: {exc.message}") from None
    else:
        weights.weights_file(spec, ResNet18_Weights)


def put_weights(cfg: Config, tracking_uri: str) -> ResolvedWeights | None:
    """Driver side: ``model.weights`` read and checked once, put in the object store; None when the task has no
    such key or trains from scratch."""
    spec = cfg.get("model", {}).get("weights")
    if not isinstance(spec, str):
        return None
    state_dict, description = resolve_state_dict(spec, tracking_uri)
    log.info("model.weights: %s", description)
    return None if state_dict is None else ResolvedWeights(ray.put(state_dict), description)


def build_model(task: Task, cfg: Config, resolved: ResolvedWeights | None) -> nn.Module:
    """Worker side: the task's model, its ``model.weights`` read from a local copy of the driver's state dict."""
    if resolved is None:
        return task.build_model(cfg)
    with tempfile.TemporaryDirectory(prefix="raycv-weights-") as directory:
        path = Path(directory) / "state_dict.pt"
        torch.save(ray.get(resolved.ref), path)
        model = task.build_model({**cfg, "model": {**cfg["model"], "weights": str(path)}})
    # Name the weights' origin, not the temporary file (keeping what the model adds, e.g. FCN's "(backbone)").
    built = getattr(model, "weights_description", f"file: {path}")
    model.weights_description = built.replace(f"file: {path}", resolved.description)
    return model
