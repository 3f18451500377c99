"""``model.weights``, resolved once on the driver and shipped to the Ray Train workers through the object store.

The driver turns the spec (``imagenet`` from its torch hub cache, downloaded there once when missing, a file path or
``s3://`` URI, or the MLflow
model URI of an earlier raycv run: ``runs:/<run id>/model``, ``models:/raycv-<task>@<alias>`` or
``models:/raycv-<task>/<version>``) into a tensor-only state dict. A missing, unreadable or malicious weights file
therefore fails in one line before any worker starts, and workers never open a path that exists only on the
driver's disk, nor need the hub cache or the tracking server.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from enum import Enum
from pathlib import Path

import mlflow
import ray
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torchvision.models import ResNet18_Weights

from cvtasks.errors import DataFormatError
from cvtasks.models import weights
from cvtasks.tasks.base import Config, Task
from pipelines import tracking
from pipelines.handoff import ResolvedWeights

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("runs:/", "models:/")
#: Base URL of a mirror of torchvision's weight files (``<base>/<file name>``) to use instead of their own URLs.
WEIGHTS_URL_ENV = "RAYCV_WEIGHTS_URL"
#: torchvision's weight files end in the first hex digits of their SHA-256, e.g. ``resnet18-f37072fd.pth``.
HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,})\.[a-z]+$")


def fetch_imagenet(weights_enum: type[Enum]) -> None:
    """Driver only: put torchvision's file of ``weights_enum.DEFAULT`` in the torch hub cache when it is missing.

    Downloaded from its torchvision URL (or ``$RAYCV_WEIGHTS_URL/<file name>``) and checked against the SHA-256
    prefix in its name, as ``torch.hub`` checks torchvision's downloads. Workers get the weights through the object
    store, so a run downloads once, never once per worker. Offline, the error says so in one line with the
    alternatives.
    """
    entry = weights_enum.DEFAULT
    cache = weights.imagenet_cache_file(entry)
    if cache.is_file():
        return
    name = Path(entry.url).name
    mirror = os.environ.get(WEIGHTS_URL_ENV)
    url = f"{mirror.rstrip('/')}/{name}" if mirror else entry.url
    found = HASH_IN_NAME.search(name)
    cache.parent.mkdir(parents=True, exist_ok=True)
    log.info("model.weights=imagenet: downloading %s into the torch hub cache (%s)", url, cache)
    try:
        torch.hub.download_url_to_file(url, str(cache), hash_prefix=found.group(1) if found else None, progress=False)
    except RuntimeError as exc:  # torch.hub's hash check; the partial file is removed
        raise DataFormatError(url, f"{exc} (nothing was written to {cache})") from None
    except OSError as exc:  # offline, refused, HTTP errors (urllib's URLError is an OSError)
        reason = getattr(exc, "reason", exc)
        raise FileNotFoundError(
            f"model.weights=imagenet: {weights_enum.__name__}.{entry.name} is not in the torch hub cache ({cache}) "
            f"and downloading {url} failed ({reason}): copy the file there, set {WEIGHTS_URL_ENV} to a mirror, or "
            f"use model.weights=scratch, a state-dict file or runs:/<run id>/model") from None


def resolve_state_dict(spec: str, tracking_uri: str) -> tuple[weights.StateDict | None, str]:
    """(state dict or None for ``scratch``, a one-line description of its origin) for a ``model.weights`` spec.

    Every ``model.weights`` task (hotdog, voc) has a torchvision ResNet-18 backbone, hence its ``imagenet`` entry.
    """
    if not spec.startswith(MLFLOW_SCHEMES):
        if spec == weights.IMAGENET:
            fetch_imagenet(ResNet18_Weights)
        return weights.resolve_state_dict(spec, ResNet18_Weights)
    client = MlflowClient(tracking_uri)
    run_id = tracking.model_run_id(client, spec)
    return tracking.load_model_state(client, run_id), spec if spec.startswith("runs:/") else f"{spec} (run {run_id})"


def weights_spec(cfg: Config) -> str | None:
    """``model.weights`` where the task's config has it."""
    return getattr(getattr(cfg, "model", None), "weights", None)


def check_weights(cfg: Config, tracking_uri: str) -> None:
    """Driver side, before Ray starts: ``model.weights`` names something that exists (nothing is loaded yet)."""
    spec = weights_spec(cfg)
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
        if spec == weights.IMAGENET:
            fetch_imagenet(ResNet18_Weights)
        weights.weights_file(spec, ResNet18_Weights)


def put_weights(cfg: Config, tracking_uri: str) -> ResolvedWeights | None:
    """Driver side: ``model.weights`` read and checked once, put in the object store; None when the task has no
    such key or trains from scratch."""
    spec = weights_spec(cfg)
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
        model = task.build_model(cfg.with_values({"model.weights": str(path)}))
    # Name the weights' origin, not the temporary file (keeping what the model adds, e.g. FCN's "(backbone)").
    built = getattr(model, "weights_description", f"file: {path}")
    model.weights_description = built.replace(f"file: {path}", resolved.description)
    return model
