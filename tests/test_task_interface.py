"""A task defined in tests/ (tests/tiny/task.py), registered at test time, runs through raycv's generic commands:
its config, demo data, data check and a Ray Train run on the test cluster, tracked in MLflow. Nothing in cvtasks
or pipelines knows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from cvtasks import tasks as registry
from pipelines import data_commands
from pipelines.config import load_config
from pipelines.demo import demo_steps
from pipelines.predict import predict
from pipelines.runners import runner_for
from pipelines.train import run_training
from tests.tiny.task import FOLDER, SIZE, TinyTask

EPOCHS = 3


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(registry.TASKS, "tiny", f"{TinyTask.__module__}:{TinyTask.__name__}")
    return "tiny"


@pytest.fixture
def tiny_root(tiny, tmp_path):
    written = data_commands.make_demo(tmp_path, only=["tiny-sides"])  # its demo writer, found through the registry
    assert written == {"tiny-sides": tmp_path / FOLDER}
    return tmp_path


def test_the_registry_derives_everything_from_the_declaration(tiny, tiny_root, capsys):
    cfg = load_config(tiny, overrides=[f"data.root={tiny_root}"])  # its own YAML, over pipelines' defaults
    assert cfg.task == tiny and cfg.model.width == 8 and cfg.scaling.workers == 1
    assert [s.name for s in demo_steps() if s.task == tiny] == ["tiny"]
    assert type(runner_for(tiny)).__name__ == "TrainRunner"
    assert tiny in registry.task_names() and "tiny-sides" in data_commands.demo_datasets()
    assert data_commands.check(cfg) == 0
    assert "train: 256 samples | per class:" in capsys.readouterr().out


@pytest.mark.slow
def test_a_test_defined_task_trains_on_the_cluster_and_predicts(tiny, tiny_root, ray_cluster, mlflow_server,
                                                                 tmp_path):
    cfg = load_config(tiny, overrides=[f"data.root={tiny_root}", f"train.epochs={EPOCHS}"])
    outcome = run_training(cfg, mlflow_server.url, register_alias="latest")
    assert outcome.metrics["val_acc"] > 0.9, outcome.metrics  # a bright square's side: learnt in a few epochs
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(outcome.run_id)
    assert run.data.tags["raycv.task"] == tiny and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val_acc")] == list(range(EPOCHS))
    mlmodel = yaml.safe_load(Path(client.download_artifacts(outcome.run_id, "model/MLmodel", str(tmp_path)))
                             .read_text())
    assert "flavors" not in mlmodel or not mlmodel["flavors"]  # a signature and an example, nothing to unpickle
    [inputs] = json.loads(mlmodel["signature"]["inputs"])
    [outputs] = json.loads(mlmodel["signature"]["outputs"])
    assert inputs["tensor-spec"]["shape"] == [-1, 1, SIZE, SIZE] and outputs["tensor-spec"]["shape"] == [-1, 2]
    assert mlmodel["saved_input_example_info"]["artifact_path"] == "input_example.json"

    image = np.full((SIZE, SIZE), 20, np.uint8)
    image[5:10, 11:16] = 230  # the square on the right
    Image.fromarray(image).save(tmp_path / "right.png")
    [written] = predict(tiny, f"models:/raycv-{tiny}@latest", [str(tmp_path / "right.png")], tmp_path / "out",
                        mlflow_server.url)
    assert written.read_text() == '{"side": "right"}'
