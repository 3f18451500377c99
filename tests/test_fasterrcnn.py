"""Banana with model.name=fasterrcnn: target conversion, weighted losses, detection rows, learning on a tiny batch,
the task's evaluation / pictures / predict, weights, the sweep file; one slow run through Ray Train and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cvtasks import two_stage
from cvtasks.demo import banana as demo
from cvtasks.models.fasterrcnn import build_fasterrcnn
from cvtasks.tasks.banana import BananaLoss, BananaTask
from pipelines.config import CONFIG_DIR, load_config
from tests.configs import at_root
from tests.test_banana import batch_of

SIZE = 64
#: A model small enough for many CPU steps in a test; anchors fit 64 px inputs.
SMALL = ["model.name=fasterrcnn", f"augment.size={SIZE}", "model.fasterrcnn.fpn_channels=16",
         "model.fasterrcnn.representation=32", "model.fasterrcnn.anchor_sizes=[8, 16, 32, 64]",
         f"model.fasterrcnn.min_size={SIZE}", f"model.fasterrcnn.max_size={SIZE}", "detect.score_threshold=0.0"]


def small_cfg(*overrides: str) -> dict:
    return load_config("banana", overrides=[*SMALL, *overrides])


def white_boxes_batch(n: int = 4) -> dict[str, torch.Tensor]:
    """Grey images with one white rectangle each (class 0) at known fractions; padding rows class -1."""
    images = torch.full((n, 3, SIZE, SIZE), 0.3)
    boxes = torch.full((n, 4, 5), -1.0)
    for i in range(n):
        x1, y1 = 0.1 + 0.15 * i, 0.2 + 0.1 * i
        x2, y2 = x1 + 0.4, y1 + 0.35
        images[i, :, round(y1 * SIZE) : round(y2 * SIZE), round(x1 * SIZE) : round(x2 * SIZE)] = 1.0
        boxes[i, 0] = torch.tensor([0, x1, y1, x2, y2])
    return {"image": images, "boxes": boxes}


def test_targets_in_pixels_with_labels_from_one_and_padding_dropped():
    boxes = torch.tensor([
        [[0, 0.1, 0.2, 0.5, 0.6], [1, 0.0, 0.0, 1.0, 1.0], [-1, -1, -1, -1, -1]],
        [[-1, -1, -1, -1, -1], [0, 0.3, 0.3, 0.3, 0.5], [-1, -1, -1, -1, -1]],  # a box without area is dropped too
    ])
    first, second = two_stage.to_targets(boxes, height=100, width=200)
    torch.testing.assert_close(first["boxes"], torch.tensor([[20.0, 20.0, 100.0, 60.0], [0.0, 0.0, 200.0, 100.0]]))
    assert first["labels"].tolist() == [1, 2] and first["labels"].dtype == torch.int64
    assert second["boxes"].shape == (0, 4) and second["labels"].tolist() == []


def test_detections_become_rows_as_fractions_with_class_from_zero_and_padding():
    found = [{"boxes": torch.tensor([[20.0, 10.0, 100.0, 50.0]]), "labels": torch.tensor([2]),
              "scores": torch.tensor([0.9])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
    rows = two_stage.to_rows(found, height=100, width=200, max_rows=3)
    assert rows.shape == (2, 3, 6)
    torch.testing.assert_close(rows[0, 0], torch.tensor([1.0, 0.9, 0.1, 0.1, 0.5, 0.5]))
    assert (rows[0, 1:, 0] == -1).all() and (rows[1, :, 0] == -1).all() and (rows[1, :, 1:] == 0).all()


def test_total_is_the_weighted_sum_and_parts_stay_unweighted():
    losses = {"rpn_objectness": torch.tensor(1.0), "rpn_box": torch.tensor(2.0), "roi_class": torch.tensor(3.0),
              "roi_box": torch.tensor(4.0)}
    weights = BananaLoss(cls_weight=1.0, bbox_weight=1.0, rpn_objectness_weight=0.5, rpn_box_weight=2.0,
                         roi_class_weight=0.0, roi_box_weight=1.0)
    total, parts = two_stage.weighted_loss(two_stage.TwoStageOutput(losses, None), weights)
    assert float(total) == pytest.approx(0.5 * 1 + 2 * 2 + 0 * 3 + 1 * 4)
    assert {k: float(v) for k, v in parts.items()} == {k: float(v) for k, v in losses.items()}
    cfg = small_cfg()
    assert set(two_stage.LOSS_NAMES.values()) == {k[: -len("_weight")] for k in cfg.raw["loss"]
                                                  if k.startswith(("rpn_", "roi_"))}


def test_box_sums_count_per_ground_truth_box():
    truth = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.5], [0, 0.6, 0.6, 0.9, 0.9], [-1, -1, -1, -1, -1]]])
    found = torch.tensor([[[0, 0.9, 0.1, 0.1, 0.5, 0.6],  # IoU 0.8 with the first box, right class
                           [1, 0.8, 0.6, 0.6, 0.9, 0.9],  # the second box exactly, wrong class
                           [0, 0.1, 0.6, 0.6, 0.9, 0.9],  # right class but below the confidence threshold
                           [-1, 0, 0, 0, 0, 0]]])
    sums = two_stage.box_sums(found, truth, score_threshold=0.5, iou_threshold=0.5)
    assert {k: float(v) for k, v in sums.items()} == pytest.approx(
        {"class_correct": 1, "class_count": 2, "bbox_abs_sum": 0.1, "bbox_count": 8})


def test_a_few_steps_on_one_tiny_batch_reduce_the_loss():
    cfg = small_cfg()
    task, batch = BananaTask(), white_boxes_batch()
    torch.manual_seed(0)
    model = task.build_model(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss, parts = task.loss(task.forward(model, batch), batch, cfg)
        assert set(parts) == set(two_stage.LOSS_NAMES.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("banana-demo")
    demo.write(root, seed=1, n_train=8, n_val=4)
    return root


def test_task_evaluates_renders_and_predicts_with_faster_rcnn(demo_root, tmp_path):
    cfg = small_cfg(f"data.root={demo_root}")
    task = BananaTask()
    decoded = task.decode(batch_of(task.index("val", at_root(cfg, str(demo_root)))), cfg)
    batch = {k: torch.from_numpy(v) for k, v in task.augment(decoded, False, cfg, np.random.default_rng(0)).items()}
    torch.manual_seed(0)
    model = task.build_model(cfg).eval()
    with torch.no_grad():
        out = task.forward(model, batch)
        loss, parts = task.loss(out, batch, cfg)
        sums = task.metric_sums(out, batch, cfg)
    assert isinstance(out, two_stage.TwoStageOutput) and torch.isfinite(loss) and len(parts) == 4
    assert out.detections.shape == (4, cfg.detect.max_candidates, 6)
    real = out.detections[out.detections[..., 0] >= 0]
    assert (real[:, 0] == 0).all() and ((real[:, 1] >= 0) & (real[:, 1] <= 1)).all()
    assert ((real[:, 2:] >= 0) & (real[:, 2:] <= 1)).all()
    metrics = task.summarize(sums, cfg)
    assert set(metrics) == {"map50", "class_err", "bbox_mae"} and 0 <= metrics["map50"] <= 1
    assert sums["gt_count"].sum() == sums["class_count"] == (batch["boxes"][..., 0] >= 0).sum()
    assert not model.training  # the evaluation pass put its stages back in evaluation mode

    picture = task.render_predictions(model, batch, cfg)  # per image a proposals and a detections tile, 4 per row
    assert picture.size == (4 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    artifacts = task.extra_artifacts(model, sums, cfg, batch)
    assert set(artifacts) == {"metrics/val_ap50_per_class.json"}  # TinySSD's anchor picture has no meaning here
    regions = two_stage.proposals(model, batch["image"], 5)
    assert len(regions) == 4 and all(r.shape[1] == 4 and len(r) <= 5 for r in regions)

    image_path = tmp_path / "photo.png"
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(image_path)
    written = task.predict_files(model, [str(image_path)], tmp_path, cfg)
    records = json.loads(written[0].read_text())
    assert records[0]["width"] == 120 and Image.open(written[1]).size == (120, 90)


def test_weights_fill_the_whole_detector_or_its_resnet18_backbone(tmp_path):
    cfg = small_cfg()
    settings, detect = cfg.model.fasterrcnn, cfg.detect
    torch.manual_seed(0)
    trained = build_fasterrcnn(1, settings, detect)
    torch.save(trained.state_dict(), tmp_path / "detector.pt")
    torch.save(trained.backbone.body.state_dict(), tmp_path / "resnet18.pt")
    torch.manual_seed(1)
    whole = build_fasterrcnn(1, settings, detect, str(tmp_path / "detector.pt"))
    backbone = build_fasterrcnn(1, settings, detect, str(tmp_path / "resnet18.pt"))
    for key, value in trained.state_dict().items():
        assert torch.equal(whole.state_dict()[key], value), key
    assert torch.equal(backbone.backbone.body.conv1.weight, trained.backbone.body.conv1.weight)
    assert not torch.equal(backbone.roi_heads.box_predictor.cls_score.weight,
                           trained.roi_heads.box_predictor.cls_score.weight)
    assert backbone.weights_description.endswith("(backbone)")
    with pytest.raises(ValueError, match="TinySSD trains from scratch"):
        BananaTask().build_model(load_config("banana", overrides=[f"model.weights={tmp_path / 'detector.pt'}"]))


def test_the_sweep_file_swaps_in_faster_rcnn_and_its_loss_weights():
    from pipelines.tune import search_space

    cfg = load_config("banana", CONFIG_DIR / "sweeps" / "banana_fasterrcnn.yaml")
    assert cfg.model.name == "fasterrcnn"
    assert set(search_space(cfg)) == {f"loss.{name}_weight" for name in two_stage.LOSS_NAMES.values()}


@pytest.mark.slow
def test_faster_rcnn_trains_through_ray_logs_map50_and_predicts(ray_cluster, mlflow_server, demo_root, tmp_path):
    """One short epoch on the module's 8-image demo (the session's has 600) through run_training, then predict."""
    from pipelines.predict import predict
    from pipelines.train import run_training

    cfg = small_cfg(f"data.root={demo_root}", "train.epochs=1", "data.batch_size=4", "data.eval_batch_size=4")
    outcome = run_training(cfg, mlflow_server.url, storage=str(tmp_path / "ray-results"))
    client = MlflowClient(mlflow_server.url)
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val_map50")] == [0]
    for name in two_stage.LOSS_NAMES.values():
        assert client.get_metric_history(outcome.run_id, f"train_loss_{name}"), name
    assert "plots/val_predictions.png" in {a.path for a in client.list_artifacts(outcome.run_id, "plots")}

    images = sorted(Path(demo_root).rglob("*.png"))[:2]
    written = predict("banana", f"runs:/{outcome.run_id}/model", [str(p) for p in images], tmp_path / "out",
                      mlflow_server.url)
    records = json.loads(written[0].read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
