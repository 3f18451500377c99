"""Nothing untrusted executes (issue 12): weights files, checkpoints and logged models are read tensor-only.

Each malicious file is a pickle whose ``__reduce__`` would create a marker file when unpickled: it must be refused
with an error naming the file, and the marker must not exist afterwards. Normal files still round-trip.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cvtasks.errors import DataFormatError
from cvtasks.models.resnet import finetune_resnet18
from cvtasks.models.vgg import resolve_vgg_weights
from cvtasks.models.weights import load_state_dict_file
from cvtasks.settings import OptimSection
from pipelines import tracking
from pipelines.config import load_config
from pipelines.loop import CHECKPOINT_FILE, load_checkpoint
from pipelines.predict import load_logged_model, predict
from pipelines.steps import make_optimizer
from pipelines.weights import resolve_state_dict

CIFAR_CLASSES = [f"class-{i}" for i in range(10)]
ADAM = OptimSection(name="adam", lr=0.01, schedule="constant", momentum=0.9, weight_decay=0.0)


class MakesMarker:
    """Unpickling this runs ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def write_malicious(path: Path, marker: Path) -> Path:
    """A torch file holding a state dict whose value runs code when fully unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": MakesMarker(marker)}, path)
    return path


def test_the_malicious_file_does_run_code_when_fully_unpickled(tmp_path, marker):
    """The fixture is real: torch.load(weights_only=False) of it creates the marker."""
    torch.load(write_malicious(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_malicious_weights_file_is_refused_naming_it(tmp_path, marker):
    evil = write_malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(DataFormatError, match=r"evil\.pt: not a tensor-only weights file.*posix\.system"):
        load_state_dict_file(str(evil))
    with pytest.raises(DataFormatError, match=r"evil\.pt"):
        finetune_resnet18(num_classes=2, weights=str(evil))
    with pytest.raises(DataFormatError, match=r"evil\.pt"):
        resolve_vgg_weights(str(evil))
    with pytest.raises(DataFormatError, match=r"evil\.pt"):
        resolve_state_dict(str(evil), "sqlite:///unused.db")  # the driver-side resolution of model.weights
    assert not marker.exists()


def test_pickled_module_is_refused_with_advice(tmp_path):
    torch.save(torch.nn.Linear(2, 1), tmp_path / "module.pt")
    with pytest.raises(DataFormatError, match=r"module\.pt: .*torch\.nn\.modules\.linear\.Linear.*state_dict\(\)"):
        load_state_dict_file(str(tmp_path / "module.pt"))


def test_malicious_checkpoint_is_refused_naming_it(tmp_path, marker):
    write_malicious(tmp_path / "checkpoint_000001" / CHECKPOINT_FILE, marker)
    with pytest.raises(DataFormatError, match=rf"checkpoint_000001/{CHECKPOINT_FILE}: not a tensor-only raycv "
                                              "checkpoint"):
        load_checkpoint(tmp_path / "checkpoint_000001")
    assert not marker.exists()


def test_checkpoint_round_trips_tensor_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer([{"params": list(model.parameters()), "lr_mult": 2.0}],
                               ADAM)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    history = [{"train_loss": 1.25, "val_acc": 0.5, "examples_per_sec": 123.4, "lr": 0.01, "epoch": 0},
               {"train_loss": 0.75, "val_acc": 0.625, "examples_per_sec": 130.0, "lr": 0.005, "epoch": 1}]
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "history": history},
               tmp_path / CHECKPOINT_FILE)  # what _save_checkpoint writes

    state = load_checkpoint(tmp_path)
    assert state["history"] == history and state["epoch"] == 1
    assert all(type(e["epoch"]) is int and type(e["val_acc"]) is float for e in state["history"])
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(state["model"])
    again = make_optimizer([{"params": list(restored.parameters()), "lr_mult": 2.0}],
                           ADAM)
    again.load_state_dict(state["optimizer"])
    torch.testing.assert_close(restored.weight, model.weight)
    assert again.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


# --- models logged in MLflow ---------------------------------------------------------------------------------------

def cifar_cfg(tmp_path: Path) -> dict:
    """A CIFAR-10 config whose data root does not exist: prediction must not need the training data."""
    return load_config("cifar10", overrides=[f"data.root={tmp_path / 'no-data-here'}", "model.width=4"])


@pytest.fixture
def store(tmp_path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_malicious_logged_model_is_refused_naming_the_artifact(tmp_path, store, marker):
    run_id = tracking.create_run(store, "cifar10", cifar_cfg(tmp_path))
    evil = write_malicious(tmp_path / "upload" / tracking.STATE_DICT_FILE, marker)
    store.log_artifact(run_id, str(evil), tracking.MODEL_DIR)
    artifact = rf"runs:/{run_id}/model/state_dict\.pt: not a tensor-only weights file"
    with pytest.raises(DataFormatError, match=artifact):
        load_logged_model("cifar10", f"runs:/{run_id}/model", store.tracking_uri)
    with pytest.raises(DataFormatError, match=artifact):
        resolve_state_dict(f"runs:/{run_id}/model", store.tracking_uri)  # model.weights=runs:/...
    assert not marker.exists()


def test_run_without_tensor_weights_is_refused(tmp_path, store):
    run_id = tracking.create_run(store, "cifar10", cifar_cfg(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"runs:/{run_id}/model/state_dict\.pt"):
        load_logged_model("cifar10", f"runs:/{run_id}/model", store.tracking_uri)
    with pytest.raises(ValueError, match="logged no model"):
        tracking.register_model(store, "cifar10", run_id, "best")


def test_logged_model_round_trips_through_runs_and_registry_uris_and_predicts(tmp_path, store):
    from cvtasks.tasks import get_task

    cfg = cifar_cfg(tmp_path)
    run_id = tracking.create_run(store, "cifar10", cfg)
    trained = get_task("cifar10").build_model(cfg.with_values({"data.class_names": CIFAR_CLASSES}))
    tracking.log_model_state(store, run_id, trained.state_dict(), CIFAR_CLASSES)
    version = tracking.register_model(store, "cifar10", run_id, "best")

    for uri in (f"runs:/{run_id}/model", "models:/raycv-cifar10@best", f"models:/raycv-cifar10/{version}"):
        model, _ = load_logged_model("cifar10", uri, store.tracking_uri)
        for key, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (uri, key)
    state, description = resolve_state_dict("models:/raycv-cifar10@best", store.tracking_uri)
    assert state.keys() == trained.state_dict().keys() and description == f"models:/raycv-cifar10@best (run {run_id})"

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    predict("cifar10", "models:/raycv-cifar10@best", [str(image)], tmp_path / "out", store.tracking_uri)
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert records[0]["class"] in CIFAR_CLASSES


def test_model_uris_that_name_no_raycv_model_fail_clearly(store):
    for uri in ("runs:/abc/other", "models:/raycv-cifar10", "mlflow-artifacts:/x"):
        with pytest.raises(ValueError, match="expected runs:/<run id>/model"):
            tracking.model_run_id(store, uri)
    with pytest.raises(ValueError, match="models:/raycv-nothing@best"):
        tracking.model_run_id(store, "models:/raycv-nothing@best")


def test_pickle_protocol_files_without_torch_zip_are_refused_too(tmp_path, marker):
    """A bare pickle (not torch's zip format) takes torch.load's legacy path: still weights-only."""
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"w": MakesMarker(marker)}))
    with pytest.raises(DataFormatError, match=r"legacy\.pt: not a tensor-only weights file"):
        load_state_dict_file(str(tmp_path / "legacy.pt"))
    assert not marker.exists()


# --- model.weights resolved on the driver ---------------------------------------------------------------------------

@pytest.mark.slow
def test_workers_build_from_the_drivers_weights_not_its_files(ray_cluster, tmp_path):
    """The weights file is read once on the driver; a Ray worker builds the model after it is gone."""
    import ray
    from torchvision.models import resnet18

    from cvtasks.tasks import get_task
    from pipelines.weights import build_model, put_weights

    source = resnet18(num_classes=10)
    path = tmp_path / "pretrained.pt"
    torch.save(source.state_dict(), path)
    cfg = load_config("hotdog", overrides=[f"model.weights={path}"])
    cfg = cfg.with_values({"data.class_names": ["hotdog", "not-hotdog"]})  # no dataset needed on the worker
    resolved = put_weights(cfg, "sqlite:///unused.db")
    path.unlink()  # exists only on the driver's disk, and not even there any more

    @ray.remote(num_cpus=0)
    def build(cfg: dict, resolved) -> tuple[dict[str, torch.Tensor], str]:
        model = build_model(get_task("hotdog"), cfg, resolved)
        return model.state_dict(), model.weights_description

    state, description = ray.get(build.remote(cfg, resolved))
    assert description == f"file: {path}"
    torch.testing.assert_close(state["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])
    assert state["fc.weight"].shape == (2, 512)

    cfg = cfg.with_values({"model.weights": "scratch"})
    assert put_weights(cfg, "sqlite:///unused.db") is None
