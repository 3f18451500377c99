"""End to end on real services: Ray Train on the session's local Ray cluster, tracked by a real MLflow server.

One CIFAR-10 run covers most of issue 2: two DDP workers, an injected worker failure that Ray Train recovers from,
per-epoch metrics logged exactly once in one MLflow run, learning well above chance, and a logged model that loads
back over HTTP and predicts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.loop import ATTEMPTS_TAG
from pipelines.predict import load_logged_model
from pipelines.train import run_training

pytestmark = pytest.mark.slow

CIFAR_EPOCHS = 3
CHANCE = 0.1


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _values(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture(scope="module")
def cifar_run(ray_cluster, mlflow_server, demo_root, tmp_path_factory):
    cfg = load_config("cifar10", overrides=[
        f"data.root={demo_root}", f"train.epochs={CIFAR_EPOCHS}", "scaling.workers=2", "data.batch_size=64",
        "train.inject_failure_at_epoch=1",
    ])
    outcome = run_training(cfg, mlflow_server.url, storage=str(tmp_path_factory.mktemp("ray-results")))
    return outcome, MlflowClient(mlflow_server.url)


def test_failure_recovery_keeps_one_run_with_each_epoch_once(cifar_run):
    outcome, client = cifar_run
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[ATTEMPTS_TAG] == "2"  # the injected failure happened and the worker group restarted once
    for key in ("train_loss", "train_acc", "val_acc", "val_loss", "examples_per_sec"):
        assert _steps(client, outcome.run_id, key) == list(range(CIFAR_EPOCHS)), key
    experiment_runs = client.search_runs([outcome.experiment_id], "tags.`raycv.kind` = 'train'")
    assert [r.info.run_id for r in experiment_runs].count(outcome.run_id) == 1
    experiment = client.get_experiment(outcome.experiment_id)
    assert experiment.name == "raycv-cifar10"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_cifar10_learns_well_above_chance(cifar_run):
    outcome, client = cifar_run
    losses = _values(client, outcome.run_id, "train_loss")
    accuracy = _values(client, outcome.run_id, "val_acc")
    assert losses[-1] < 0.8 * losses[0]
    assert accuracy[-1] > CHANCE + 0.25, accuracy
    assert outcome.metrics["val_acc"] == pytest.approx(accuracy[-1])


def test_run_records_config_params_and_pictures(cifar_run):
    outcome, client = cifar_run
    run = client.get_run(outcome.run_id)
    assert run.data.params["scaling.workers"] == "2"
    assert run.data.params["optim.name"] == "adam"
    artifacts = _artifacts(client, outcome.run_id)
    assert {"config.yaml", "plots/learning_curves.png", "plots/train_augmented.png",
            "plots/val_predictions.png", "metrics/val_confusion.json"} <= artifacts


def test_logged_model_loads_over_http_and_predicts(cifar_run, mlflow_server):
    """The model is logged as tensors only (``model/state_dict.pt`` + class names) and rebuilt from the run's config."""
    outcome, client = cifar_run
    assert {"model/state_dict.pt", "model/class_names.json"} <= _artifacts(client, outcome.run_id, "model")
    model, _ = load_logged_model("cifar10", f"runs:/{outcome.run_id}/model", mlflow_server.url)
    with torch.no_grad():
        scores = model(torch.from_numpy(np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)))
    assert scores.shape == (4, 10)
