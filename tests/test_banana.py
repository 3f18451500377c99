"""Banana detection: reader and errors, demo writer, box-aware augmentation, TinySSD, loss, mAP, the task."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cvtasks import box_augment as A
from cvtasks import boxes as B
from cvtasks import detection as det
from cvtasks.demo import banana as demo
from cvtasks.errors import DataFormatError
from cvtasks.formats import banana as fmt
from cvtasks.images import encode_png
from cvtasks.models.ssd import TinySSD
from cvtasks.settings import TaskConfig
from cvtasks.tasks.banana import BananaTask
from tests.configs import at_root, typed_config

HEADER = "img_name,label,xmin,ymin,xmax,ymax"
CFG = {
    "data": {"classes": ["banana", "apple"], "max_objects": 4, "skip_bad": False},
    "model": {"width": 0.25},
    "loss": {"cls_weight": 1.0, "bbox_weight": 1.0},
    "augment": {"size": 64, "hflip": 0.5, "crop": 0.5, "crop_scale": [0.3, 1.0], "crop_ratio": [0.5, 2.0],
                "crop_min_visible": 0.5, "color": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.0}},
    "detect": {"nms_threshold": 0.5, "pos_threshold": 0.01, "score_threshold": 0.0, "score_bins": 1000,
               "max_candidates": 50},
}


def cfg_with(root=None, **data) -> TaskConfig:
    return typed_config("banana", {**CFG, "data": {**CFG["data"], **data}}, root)


def write_split(root, rows: list[str], sizes: dict[str, tuple[int, int]], split: str = "train"):
    """A hand-made split: images of the given (width, height), label.csv with ``rows`` under the header."""
    folder = root / fmt.DATASET_DIR / fmt.SPLIT_DIRS[split]
    (folder / fmt.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for name, (width, height) in sizes.items():
        (folder / fmt.IMAGES_DIR / name).write_bytes(encode_png(np.full((height, width, 3), 90, np.uint8)))
    (folder / fmt.LABEL_FILE).write_text("\n".join([HEADER, *rows]) + "\n")
    return folder / fmt.LABEL_FILE


def batch_of(frame) -> dict[str, np.ndarray]:
    return {col: frame[col].to_numpy() for col in frame.columns}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("banana-demo")
    demo.write(root, seed=1, n_train=8, n_val=4, classes=("banana", "apple"))
    return root


# --- reader ------------------------------------------------------------------------------------------------------

def test_reader_groups_objects_per_image_and_normalises_by_each_images_size(tmp_path):
    write_split(tmp_path, ["a.png,0,10,20,30,40", "b.png,1,0,0,64,32", "a.png,1,40,0,80,60"],
                {"a.png": (80, 60), "b.png": (64, 32), "unlabelled.png": (8, 8)})
    index = fmt.index(str(tmp_path), "train", num_classes=2)
    assert [p.rsplit("/", 1)[-1] for p in index["path"]] == ["a.png", "b.png"]
    np.testing.assert_array_equal(index["boxes"][0], [[0, 10, 20, 30, 40], [1, 40, 0, 80, 60]])
    np.testing.assert_array_equal(index["rows"][0], [2, 4])
    assert list(index["problem"]) == ["", ""]
    image, boxes = fmt.read_sample(index["path"][0], index["boxes"][0], index["rows"][0], index["label_file"][0])
    assert image.shape == (60, 80, 3)
    np.testing.assert_allclose(boxes, [[0, 10 / 80, 20 / 60, 30 / 80, 40 / 60], [1, 0.5, 0, 1, 1]])


@pytest.mark.parametrize(("row", "problem"), [
    ("missing.png,0,1,1,5,5", r"image .*missing\.png is missing"),
    ("a.png,0,20,1,10,5", "inverted or empty box"),
    ("a.png,0,1,5,5,5", "inverted or empty box"),
    ("a.png,0,-1,1,5,5", "box starts outside the image"),
    ("a.png,0,1,one,5,5", "ymin is not a number: 'one'"),
    ("a.png,0,1,1,5,nan", "ymax is not a finite number"),
    ("a.png,2,1,1,5,5", r"unknown class id '2' \(valid: 0..1\)"),
    ("a.png,0.5,1,1,5,5", "unknown class id '0.5'"),
    ("a.png,0,1,1,5", "expected 6 fields"),
])
def test_bad_rows_name_the_label_file_and_row(tmp_path, row, problem):
    labels = write_split(tmp_path, ["a.png,0,1,1,5,5", row], {"a.png": (16, 16)})
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(labels))}, row 3: {problem}"):
        fmt.index(str(tmp_path), "train", num_classes=2)


def test_bad_header_and_missing_label_file_are_named(tmp_path):
    labels = write_split(tmp_path, [], {"a.png": (16, 16)})
    labels.write_text("name,label,x1,y1,x2,y2\n")
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(labels))}, row 1: header must be"):
        fmt.index(str(tmp_path), "train", num_classes=1)
    labels.unlink()
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(labels))}: cannot read"):
        fmt.index(str(tmp_path), "train", num_classes=1)


def test_box_outside_the_decoded_image_names_file_and_row(tmp_path):
    labels = write_split(tmp_path, ["a.png,0,1,1,5,5", "b.png,0,0,0,4,4", "a.png,0,10,10,17,16"],
                         {"a.png": (16, 16), "b.png": (4, 4)})
    cfg = cfg_with(tmp_path)
    task = BananaTask()
    batch = batch_of(task.index("train", at_root(cfg, str(tmp_path))))
    with pytest.raises(DataFormatError,
                       match=rf"{re.escape(str(labels))}, row 4: box .* reaches outside image .*a\.png \(16x16"):
        task.decode(batch, cfg)


def test_skip_bad_turns_every_error_into_a_counted_skip(tmp_path):
    write_split(tmp_path, ["a.png,0,1,1,5,5", "b.png,7,1,1,5,5", "c.png,0,1,1,99,5", "gone.png,0,1,1,2,2",
                           "d.png,1,0,0,16,16"], {n: (16, 16) for n in ("a.png", "b.png", "c.png", "d.png")})
    cfg = cfg_with(tmp_path, skip_bad=True)
    task = BananaTask()
    index = task.index("train", at_root(cfg, str(tmp_path)))
    assert [bool(p) for p in index["problem"]] == [False, True, False, True, False]
    assert "row 3: unknown class id '7'" in index["problem"][1]
    decoded = task.decode(batch_of(index), cfg)
    assert decoded["keep"].tolist() == [True, False, False, False, True]
    out = task.augment(decoded, False, cfg, np.random.default_rng(0))
    assert out["image"].shape == (2, 3, 64, 64) and out["boxes"].shape == (2, 4, 5)
    np.testing.assert_allclose(out["boxes"][1, 0], [1, 0, 0, 1, 1])


def test_more_objects_than_max_objects_is_a_clear_error(tmp_path):
    write_split(tmp_path, ["a.png,0,1,1,5,5"] * 3, {"a.png": (16, 16)})
    with pytest.raises(ValueError, match=r"has 3 boxes but data.max_objects is 2"):
        BananaTask().index("train", at_root(cfg_with(tmp_path, max_objects=2), str(tmp_path)))


# --- demo writer ---------------------------------------------------------------------------------------------------

def test_demo_is_read_back_with_boxes_on_the_fruits(demo_root):
    cfg = cfg_with(demo_root)
    task = BananaTask()
    for split, count in (("train", 8), ("val", 4)):
        index = task.index(split, at_root(cfg, str(demo_root)))
        assert len(index) == count
        decoded = task.decode(batch_of(index), cfg)
        assert decoded["keep"].all()
        for image, boxes in zip(decoded["image"], decoded["boxes"], strict=True):
            assert image.shape == (256, 256, 3) and 1 <= len(boxes) <= 3
            assert set(boxes[:, 0].tolist()) <= {0.0, 1.0}
            assert (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= 1).all()
            for _, x1, y1, x2, y2 in (boxes * [1, 256, 256, 256, 256]).astype(int):
                patch = image[y1:y2, x1:x2].astype(int)
                assert (patch[..., 0] - patch[..., 2]).max() > 100  # yellow / red fruit pixels inside its box
    all_boxes = np.concatenate(list(task.index("train", at_root(cfg, str(demo_root)))["boxes"]))
    assert {0.0, 1.0} == set(all_boxes[:, 0].tolist())


def test_demo_is_deterministic(tmp_path):
    first, second = demo.write(tmp_path / "a", seed=3, n_train=2, n_val=1), demo.write(tmp_path / "b", seed=3,
                                                                                        n_train=2, n_val=1)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 5
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="demo classes"):
        demo.write(tmp_path / "c", classes=("pear",))


# --- augmentation ------------------------------------------------------------------------------------------------

def test_hflip_boxes_by_hand():
    flipped = A.hflip_boxes(np.array([[1, 0.1, 0.2, 0.4, 0.9]], np.float32))
    np.testing.assert_allclose(flipped, [[1, 0.6, 0.2, 0.9, 0.9]], atol=1e-6)


def white_box_image(box_pixels, size=(40, 60)) -> np.ndarray:
    """Black (H, W) image with a white rectangle (x1, y1, x2, y2)."""
    image = np.zeros((*size, 3), np.uint8)
    x1, y1, x2, y2 = box_pixels
    image[y1:y2, x1:x2] = 255
    return image


def test_flipped_batch_moves_image_and_boxes_together():
    image = white_box_image((6, 4, 21, 30), size=(40, 60))
    boxes = np.array([[0, 6 / 60, 4 / 40, 21 / 60, 30 / 40]], np.float32)
    aug = A.BoxAugment(size=60, max_objects=2, hflip=1.0)
    x, out = A.detection_batch([image], [boxes], aug, train=True, rng=np.random.default_rng(0))
    assert x.shape == (1, 60, 60, 3) and x.dtype == np.uint8 and out.shape == (1, 2, 5)
    np.testing.assert_allclose(out[0, 0], [0, 39 / 60, 4 / 40, 54 / 60, 30 / 40], atol=1e-6)
    np.testing.assert_array_equal(out[0, 1], [-1] * 5)
    white = np.argwhere(x[0, ..., 0] > 127)  # rows, cols of white pixels in the resized, flipped image
    x1, x2 = white[:, 1].min() / 60, (white[:, 1].max() + 1) / 60
    assert abs(x1 - out[0, 0, 1]) < 2 / 60 and abs(x2 - out[0, 0, 3]) < 2 / 60


def test_crop_keeps_clips_and_drops_boxes_by_visible_share():
    boxes = np.array([
        [0, 0.6, 0.1, 0.8, 0.3],  # inside the right half
        [1, 0.3, 0.5, 0.7, 0.7],  # half inside: kept at min_visible 0.5, clipped
        [0, 0.0, 0.0, 0.4, 0.4],  # outside
        [1, 0.4, 0.8, 0.6, 0.9],  # half inside: kept, clipped at x=0.5
        [0, 0.35, 0.2, 0.6, 0.3],  # 40% inside: dropped
    ], np.float32)
    kept = A.crop_boxes(boxes, (0.5, 0.0, 1.0, 1.0), min_visible=0.5)
    np.testing.assert_allclose(kept, [[0, 0.2, 0.1, 0.6, 0.3], [1, 0.0, 0.5, 0.4, 0.7], [1, 0.0, 0.8, 0.2, 0.9]],
                               atol=1e-6)
    assert A.crop_boxes(boxes, (0.5, 0.0, 1.0, 1.0), min_visible=0.9).shape == (1, 5)


def test_random_crop_keeps_a_box_over_the_same_pixels():
    image = white_box_image((30, 10, 50, 30), size=(60, 80))
    boxes = np.array([[0, 30 / 80, 10 / 60, 50 / 80, 30 / 60]], np.float32)
    aug = A.BoxAugment(size=40, max_objects=1, crop=1.0, crop_scale=(0.2, 0.6))
    rng = np.random.default_rng(0)
    for _ in range(20):
        cropped, kept = A.random_crop(image, boxes, aug, rng)
        assert cropped.shape == (40, 40, 3) and len(kept) == 1
        x1, y1, x2, y2 = np.rint(kept[0, 1:] * 40).astype(int)
        inner = cropped[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
        assert inner.size == 0 or inner.min() > 200


def test_pad_boxes_uses_class_minus_one_and_rejects_too_many():
    padded = A.pad_boxes([np.ones((2, 5), np.float32), np.zeros((0, 5), np.float32)], 3)
    assert padded.shape == (2, 3, 5) and (padded[0, 2] == -1).all() and (padded[1] == -1).all()
    with pytest.raises(ValueError, match="data.max_objects is 1"):
        A.pad_boxes([np.ones((2, 5), np.float32)], 1)


# --- model and loss ----------------------------------------------------------------------------------------------

def test_tiny_ssd_output_shapes_and_anchor_count():
    model = TinySSD(num_classes=1).eval()
    with torch.no_grad():
        anchors, cls_preds, bbox_preds = model(torch.zeros(2, 3, 256, 256))
    assert anchors.shape == (1, 5444, 4) and cls_preds.shape == (2, 5444, 2) and bbox_preds.shape == (2, 5444 * 4)
    first_scale = B.multibox_prior(torch.zeros(1, 1, 32, 32), [0.2, 0.272], [1, 2, 0.5])
    torch.testing.assert_close(anchors[:, : 32 * 32 * 4], first_scale)
    assert [tuple(m.shape[-2:]) for m in model.feature_maps(torch.zeros(1, 3, 256, 256))] == [
        (32, 32), (16, 16), (8, 8), (4, 4), (1, 1)]
    narrow = TinySSD(num_classes=3, width=0.5)
    anchors, cls_preds, _ = narrow(torch.zeros(1, 3, 128, 128))
    assert anchors.shape == (1, 1364, 4) and cls_preds.shape == (1, 1364, 4)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in model.parameters()) / 3


def test_loss_parts_by_hand_and_weights():
    anchors = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    labels = torch.tensor([[[0.0, 0.0, 0.0, 0.5, 0.5]]])  # class 0 exactly on anchor 0
    target = det.targets(anchors, labels)
    assert target.class_labels.tolist() == [[1, 0]]
    cls_preds = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
    bbox_preds = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0]])  # the background anchor's are masked
    cls, bbox = det.loss_parts(cls_preds, bbox_preds, target)
    expected_ce = (torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log1p(torch.exp(torch.tensor(-1.0)))) / 2
    torch.testing.assert_close(cls, expected_ce)
    torch.testing.assert_close(bbox, torch.tensor(0.0), atol=1e-4, rtol=0)  # offsets of a perfect match ~ 0
    task = BananaTask()
    out = det.SSDOutput(anchors, cls_preds, bbox_preds + torch.tensor([[0.8] + [0.0] * 7]), target)
    cfg = cfg_with().with_values({"loss.cls_weight": 2.0, "loss.bbox_weight": 0.5})
    total, parts = task.loss(out, {"boxes": labels}, cfg)
    torch.testing.assert_close(parts["bbox"], torch.tensor(0.1), atol=1e-4, rtol=0)  # |0.8| over 8 offsets
    torch.testing.assert_close(total, 2.0 * parts["cls"] + 0.5 * parts["bbox"])


# --- mAP -----------------------------------------------------------------------------------------------------------

def rows(*detections) -> torch.Tensor:
    return torch.tensor([list(d) for d in detections], dtype=torch.float32)


def test_ap_by_hand_with_duplicates_wrong_class_and_low_iou():
    gt = torch.tensor([[[0, 0.0, 0.0, 0.2, 0.2], [0, 0.5, 0.5, 0.7, 0.7], [0, 0.8, 0.0, 1.0, 0.2], [-1] * 5]])
    found = rows(
        (0, 0.9, 0.0, 0.0, 0.2, 0.2),  # TP (gt 0)
        (0, 0.8, 0.0, 0.0, 0.2, 0.19),  # FP: gt 0 already taken by a better detection
        (0, 0.7, 0.5, 0.5, 0.7, 0.7),  # TP (gt 1)
        (0, 0.6, 0.8, 0.0, 0.9, 0.1),  # FP: IoU 0.25 with gt 2
        (1, 0.95, 0.8, 0.0, 1.0, 0.2),  # class 1: no class-1 truth, FP of class 1
        (-1, 0.99, 0.8, 0.0, 1.0, 0.2),  # not a detection
    )[None]
    sums = det.ap_sums(found, gt, num_classes=2)
    assert sums["gt_count"].tolist() == [3, 0]
    assert sums["tp_hist"][0].nonzero().flatten().tolist() == [700, 900]
    assert sums["fp_hist"][0].nonzero().flatten().tolist() == [600, 800]
    assert sums["fp_hist"][1].sum() == 1
    # Points (recall, precision): (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2) -> AP = 1/3 * 1 + 1/3 * 2/3.
    ap = det.average_precision(sums["tp_hist"], sums["fp_hist"], sums["gt_count"])
    torch.testing.assert_close(ap[0], torch.tensor(5 / 9, dtype=torch.float64))
    assert torch.isnan(ap[1])
    assert det.mean_ap(sums["tp_hist"], sums["fp_hist"], sums["gt_count"]) == pytest.approx(5 / 9)


def voc_ap_oracle(detections: list[list[float]], truth: list[list[list[float]]], num_classes: int) -> list[float]:
    """VOC devkit's evaluation in plain Python. detections: (image, class, score, x1, y1, x2, y2)."""
    aps = []
    for c in range(num_classes):
        gts = {i: [b for b in image if b[0] == c] for i, image in enumerate(truth)}
        taken = {i: [False] * len(g) for i, g in gts.items()}
        npos = sum(len(g) for g in gts.values())
        tp, fp = [], []
        for image, _, _, *box in sorted((d for d in detections if d[1] == c), key=lambda d: -d[2]):
            ious = [_iou(box, g[1:]) for g in gts[image]]
            best = max(range(len(ious)), key=ious.__getitem__) if ious else -1
            hit = best >= 0 and ious[best] >= 0.5 and not taken[image][best]
            if hit:
                taken[image][best] = True
            tp.append(float(hit))
            fp.append(float(not hit))
        if npos == 0:
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = np.concatenate([[0.0], ctp / npos, [1.0]])
        precision = np.concatenate([[0.0], ctp / np.maximum(ctp + cfp, 1e-12), [0.0]])
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        steps = np.nonzero(recall[1:] != recall[:-1])[0]
        aps.append(float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1])))
    return aps


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def random_scene(generator: torch.Generator, images: int = 6, gt_per_image: int = 3, det_per_image: int = 12,
                 num_classes: int = 2):
    """Ground truth with padding and detections jittered around it (distinct scores at bin centres)."""
    centers = torch.rand(images, gt_per_image, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(images, gt_per_image, 2, generator=generator) * 0.2 + 0.1
    gt_boxes = torch.cat((centers - sizes / 2, centers + sizes / 2), -1)
    gt_class = torch.randint(0, num_classes, (images, gt_per_image, 1), generator=generator).float()
    gt_class[:, -1] = -1  # one padding row per image
    labels = torch.cat((gt_class, gt_boxes), -1)
    pick = torch.randint(0, gt_per_image, (images, det_per_image), generator=generator)
    base = gt_boxes.gather(1, pick[..., None].expand(-1, -1, 4))
    boxes = base + (torch.rand(images, det_per_image, 4, generator=generator) - 0.5) * 0.12
    cls = torch.randint(-1, num_classes, (images, det_per_image, 1), generator=generator).float()
    scores = (torch.randperm(images * det_per_image, generator=generator).reshape(images, det_per_image, 1) * 7
              % 997 + 0.5) / 1000
    return torch.cat((cls, scores, boxes), -1), labels


def test_ap_matches_the_voc_devkit_oracle_on_random_scenes():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        found, labels = random_scene(generator)
        sums = det.ap_sums(found, labels, num_classes=2)
        flat = [[i, *d] for i, image in enumerate(found.tolist()) for d in image if d[0] >= 0]
        expected = voc_ap_oracle(flat, labels.tolist(), num_classes=2)
        ap = det.average_precision(sums["tp_hist"], sums["fp_hist"], sums["gt_count"])
        np.testing.assert_allclose(ap[~torch.isnan(ap)].numpy(), expected, atol=1e-9)


def test_sums_of_per_worker_statistics_give_the_global_map():
    found, labels = random_scene(torch.Generator().manual_seed(1), images=8)
    whole = det.ap_sums(found, labels, num_classes=2)
    parts = [det.ap_sums(found[s], labels[s], num_classes=2) for s in (slice(0, 3), slice(3, 8))]
    for key in whole:
        torch.testing.assert_close(parts[0][key] + parts[1][key], whole[key])
    summed = {k: parts[0][k] + parts[1][k] for k in whole}
    assert det.mean_ap(**summed) == det.mean_ap(**whole)
    assert det.mean_ap(**parts[0]) != det.mean_ap(**whole)  # a mean of per-worker mAPs would be wrong


def test_capped_candidates_give_the_same_detections_as_all_anchors():
    torch.manual_seed(0)
    model = TinySSD(num_classes=2, width=0.25).eval()
    with torch.no_grad():
        anchors, cls_preds, bbox_preds = model(torch.rand(2, 3, 64, 64))
    full = det.detect(anchors, cls_preds, bbox_preds)
    capped = det.detect(anchors, cls_preds, bbox_preds, max_candidates=40)
    assert full.shape == (2, anchors.shape[1], 6) and capped.shape == (2, 40, 6)
    # Each image's 40th best confidence: the capped detections are the full ones at or above it.
    kth = torch.softmax(cls_preds, -1)[..., 1:].max(-1).values.topk(40, dim=1).values[:, -1]
    for image_full, image_capped, threshold in zip(full, capped, kth, strict=True):
        expected = image_full[(image_full[:, 0] >= 0) & (image_full[:, 1] >= threshold)]
        torch.testing.assert_close(image_capped[image_capped[:, 0] >= 0], expected)
        assert len(expected) > 0


# --- the task ------------------------------------------------------------------------------------------------------

def test_task_trains_evaluates_renders_and_predicts(demo_root, tmp_path):
    cfg = cfg_with(demo_root)
    task = BananaTask()
    assert task.metric == "val_map50" and task.tensor_keys == ("image", "boxes") and not task.train_metrics
    decoded = task.decode(batch_of(task.index("train", at_root(cfg, str(demo_root)))), cfg)
    batch = task.augment(decoded, True, cfg, np.random.default_rng(0))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == np.float32
    assert batch["boxes"].shape == (8, 4, 5) and batch["boxes"].dtype == np.float32
    tensors = {k: torch.from_numpy(batch[k]) for k in task.tensor_keys}
    torch.manual_seed(0)
    model = task.build_model(cfg)
    out = task.forward(model, tensors)
    loss, parts = task.loss(out, tensors, cfg)
    loss.backward()
    assert set(parts) == {"cls", "bbox"} and torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        sums = task.metric_sums(task.forward(model, tensors), tensors, cfg)
    metrics = task.summarize(sums, cfg)
    assert set(metrics) == {"map50", "class_err", "bbox_mae"} and 0 <= metrics["map50"] <= 1
    assert sums["gt_count"].sum() == (batch["boxes"][..., 0] >= 0).sum()
    assert task.render_inputs(batch, cfg).size[0] > 4 * 64
    assert task.render_predictions(model, tensors, cfg).size[0] > 4 * 64
    artifacts = task.extra_artifacts(model, sums, cfg, tensors)
    assert artifacts["plots/anchors_one_cell.png"].size[0] > 5 * 64
    assert set(artifacts["metrics/val_ap50_per_class.json"]) == {"banana", "apple"}

    image_path = tmp_path / "photo.png"
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(image_path)
    written = task.predict_files(model, [str(image_path)], tmp_path, cfg)
    assert [p.name for p in written] == ["detections.json", "000_photo.png"]
    records = json.loads(written[0].read_text())
    assert records[0]["width"] == 120 and records[0]["height"] == 90
    for found in records[0]["detections"]:
        assert found["class"] in ("banana", "apple") and 0 <= found["score"] <= 1
        x1, y1, x2, y2 = found["box"]
        assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 90
    assert Image.open(written[1]).size == (120, 90)
