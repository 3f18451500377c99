"""Turn ``model.weights: runs:/<run_id>/model`` (or ``models:/...``) into a local state-dict file for the task.

cvtasks knows weight specs that are ``imagenet``, ``scratch`` or a file path; models logged by an earlier raycv run
live in MLflow, which only this layer talks to. Resolution happens on each worker, so it works on any node that
reaches the tracking server.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import mlflow
import torch

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def resolve_model_uris(cfg: dict, tracking_uri: str) -> dict:
    """A copy of ``cfg`` whose ``model.weights``, when an MLflow model URI, points at a downloaded state dict."""
    spec = cfg.get("model", {}).get("weights")
    if not isinstance(spec, str) or not spec.startswith(MLFLOW_SCHEMES):
        return cfg
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(spec, map_location="cpu")
    path = Path(tempfile.mkdtemp(prefix="raycv-weights-")) / "state_dict.pt"
    torch.save(model.state_dict(), path)
    log.info("model.weights %s -> %s", spec, path)
    resolved = copy.deepcopy(cfg)
    resolved["model"]["weights"] = str(path)
    resolved["model"]["weights_source"] = spec
    return resolved
