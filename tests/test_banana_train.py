"""End to end: banana detection trained by Ray Train on two workers, tracked in MLflow, beats an untrained TinySSD."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cvtasks.tasks import get_task
from pipelines.config import load_config
from pipelines.train import run_training

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

EPOCHS = 6
#: How far above the untrained model's mAP@0.5 the trained one must be.
MARGIN = 0.2


def untrained_val_map50(cfg: dict) -> float:
    """mAP@0.5 on the validation split of the model a run starts from (same seed), without Ray."""
    task = get_task("banana")
    torch.manual_seed(int(cfg.train.seed))
    model = task.build_model(cfg).eval()
    index = task.index("val", cfg)
    sums: dict[str, torch.Tensor] = {}
    batch_size = int(cfg.data.eval_batch_size)
    for start in range(0, len(index), batch_size):
        chunk = index.iloc[start : start + batch_size]
        decoded = task.decode({c: chunk[c].to_numpy() for c in chunk.columns}, cfg)
        batch = task.augment(decoded, False, cfg, np.random.default_rng(0))
        tensors = {k: torch.from_numpy(batch[k]) for k in task.tensor_keys}
        with torch.no_grad():
            for key, value in task.metric_sums(task.forward(model, tensors), tensors, cfg).items():
                sums[key] = sums[key] + value.double() if key in sums else value.double()
    return task.summarize(sums, cfg)["map50"]


def test_banana_learns_on_two_workers(ray_cluster, mlflow_server, demo_root, tmp_path):
    cfg = load_config("banana", overrides=[f"data.root={demo_root}", f"train.epochs={EPOCHS}", "scaling.workers=2",
                                           "data.batch_size=8"])  # 2 x 8 per step: 38 steps per epoch
    before = untrained_val_map50(cfg)
    outcome = run_training(cfg, mlflow_server.url, storage=str(tmp_path / "ray-results"))
    after = outcome.metrics["val_map50"]
    log.info("banana val_map50: untrained %.3f, after %d epochs %.3f (%.0f s)", before, EPOCHS, after,
             outcome.wall_seconds)
    assert after > before + MARGIN, (before, after)

    client = MlflowClient(mlflow_server.url)
    history = client.get_metric_history(outcome.run_id, "val_map50")
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    for key in ("train_loss", "train_loss_cls", "train_loss_bbox", "val_class_err", "val_bbox_mae"):
        assert client.get_metric_history(outcome.run_id, key), key
    artifacts = {a.path for folder in ("plots", "metrics") for a in client.list_artifacts(outcome.run_id, folder)}
    assert {"plots/train_augmented.png", "plots/val_predictions.png", "plots/anchors_one_cell.png",
            "metrics/val_ap50_per_class.json"} <= artifacts
