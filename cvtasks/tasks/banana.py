"""Object detection on banana-detection with TinySSD (d2l 13.3-13.7).

Data: ``banana-detection`` under ``data.root`` (:mod:`cvtasks.formats.banana`); class names by id in
``data.classes``. Decoded samples are an image and its boxes normalised by the image's size; augmentation
(:mod:`cvtasks.box_augment`) resizes to ``augment.size``, flips / crops / colour-jitters training images with their
boxes and pads every image's boxes to ``data.max_objects`` rows (class -1).

Loss: ``loss.cls_weight`` x cross-entropy over anchor classes + ``loss.bbox_weight`` x masked L1 over offsets.
Metrics (validation only: mAP needs NMS per image): ``class_err`` and ``bbox_mae`` as d2l reports them, and
``map50``, VOC-style mAP at IoU 0.5 over all detections after NMS, from histograms summed over workers.

``model.name=fasterrcnn`` trains a two-stage Faster R-CNN (:mod:`cvtasks.two_stage`) on the same batches instead:
the loss is the ``loss.<name>_weight``-weighted sum of its four losses, map50 comes from its detections as above,
and class_err / bbox_mae count per ground-truth box (:func:`cvtasks.two_stage.box_sums`), not per anchor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from cvtasks import detection as det
from cvtasks import storage, two_stage
from cvtasks import transforms as T
from cvtasks.box_augment import BoxAugment, detection_batch, resize
from cvtasks.catalog import ALL_CORES, D2L_DATA_URL, Dataset, DemoStep, Download
from cvtasks.errors import DataFormatError
from cvtasks.formats import banana as fmt
from cvtasks.formats.imagefolder import PLACEHOLDER
from cvtasks.images import decode_rgb, object_array
from cvtasks.models.fasterrcnn import FasterRCNNSettings, build_fasterrcnn
from cvtasks.models.ssd import TinySSD
from cvtasks.models.weights import SCRATCH
from cvtasks.pictures import (
    PALETTE,
    PREDICTION_COLOUR,
    TEXT_COLOUR,
    TRUTH_COLOUR,
    captioned_tile,
    denormalize,
    draw_boxes,
    grid,
    to_pixels,
)
from cvtasks.settings import DataSection, Section
from cvtasks.tasks.base import Batch, Config, Task, TensorBatch

log = logging.getLogger(__name__)

#: IoU at which a detection matches a ground-truth box for the headline metric (the "50" of map50).
MAP_IOU = 0.5
RENDER_SAMPLES = 8
RENDER_COLUMNS = 4
#: Most detections drawn per image in pictures, and written per image by predict (highest confidence first).
MAX_DRAWN = 10
MAX_PREDICTED = 100
#: ``model.name`` values: the single-shot TinySSD and the two-stage Faster R-CNN.
MODELS = ("tinyssd", "fasterrcnn")
#: RPN proposals drawn per image beside a two-stage model's detections.
PROPOSALS_DRAWN = 10
PROPOSAL_COLOUR = PALETTE[0]


@dataclass(frozen=True)
class BananaData(DataSection):
    classes: list[str]  # class names by label id
    max_objects: int  # boxes per image after padding with class -1 rows


@dataclass(frozen=True)
class BananaModel(Section):
    name: str = MODELS[0]  # tinyssd | fasterrcnn (TinySSD for runs logged before there was a choice)
    width: float = 0.5  # tinyssd: channel multiple of d2l's TinySSD
    weights: str = SCRATCH  # fasterrcnn: scratch | imagenet | a state-dict file | runs:/<id>/model
    fasterrcnn: FasterRCNNSettings | None = None


@dataclass(frozen=True)
class BananaLoss(Section):
    cls_weight: float
    bbox_weight: float
    rpn_objectness_weight: float = 1.0
    rpn_box_weight: float = 1.0
    roi_class_weight: float = 1.0
    roi_box_weight: float = 1.0


@dataclass(frozen=True)
class BananaAugment(Section):
    size: int
    hflip: float
    crop: float
    crop_scale: list[float]
    crop_ratio: list[float]
    crop_min_visible: float
    color: dict[str, float]


def class_names(cfg: Config) -> list[str]:
    names = list(cfg.data.classes)
    if not names:
        raise ValueError("data.classes must name at least one class")
    return names


def box_augment(cfg: Config) -> BoxAugment:
    aug: BananaAugment = cfg.augment
    return BoxAugment(size=aug.size, max_objects=cfg.data.max_objects, hflip=aug.hflip, crop=aug.crop,
                      crop_scale=tuple(aug.crop_scale), crop_ratio=tuple(aug.crop_ratio),
                      crop_min_visible=aug.crop_min_visible, color=aug.color)


def model_name(cfg: Config) -> str:
    """``model.name``, checked."""
    name = cfg.model.name
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {', '.join(MODELS)}, got {name!r}")
    return name


def detections(model: nn.Module, images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """[B, K, 6] rows (class or -1, confidence, x1, y1, x2, y2) of ``model`` on model-ready ``images``."""
    if two_stage.is_two_stage(model):
        return two_stage.detections(model, images)
    return detect(*model(images), cfg)


def detect(anchors: torch.Tensor, cls_preds: torch.Tensor, bbox_preds: torch.Tensor, cfg: Config) -> torch.Tensor:
    settings: det.DetectSettings = cfg.detect
    return det.detect(anchors, cls_preds, bbox_preds, settings.nms_threshold, settings.pos_threshold,
                      settings.max_candidates)


def shown(rows: torch.Tensor, cfg: Config, limit: int) -> torch.Tensor:
    """The rows of one image's detections worth showing: a class, confidence >= ``detect.score_threshold``."""
    keep = (rows[:, 0] >= 0) & (rows[:, 1] >= cfg.detect.score_threshold)
    rows = rows[keep]
    return rows[rows[:, 1].argsort(descending=True)][:limit]


def display(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Model inputs float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3)."""
    return denormalize(images, None, None)


def draw_truth(image: np.ndarray, boxes: np.ndarray, names: list[str]) -> np.ndarray:
    boxes = np.asarray(boxes)[np.asarray(boxes)[:, 0] >= 0]
    captions = [names[int(c)] for c in boxes[:, 0]]
    return draw_boxes(image, to_pixels(boxes[:, 1:], *image.shape[:2]), TRUTH_COLOUR, captions)


def draw_detections(image: np.ndarray, rows: np.ndarray, names: list[str]) -> np.ndarray:
    """``rows`` (K, 6) (class, confidence, box as fractions) outlined on ``image`` with "class confidence"."""
    captions = [f"{names[int(c)]} {s:.2f}" for c, s in rows[:, :2]]
    return draw_boxes(image, to_pixels(rows[:, 2:], *image.shape[:2]), PREDICTION_COLOUR, captions, below=True)


class BananaTask(Task):
    name = "banana"
    metric = "val_map50"
    sections = {"data": BananaData, "model": BananaModel, "loss": BananaLoss, "augment": BananaAugment,
                "detect": det.DetectSettings}
    datasets = (Dataset(
        "banana", "banana-detection", demo_writer="cvtasks.demo.banana:write", demo_cost=5,
        download=Download(D2L_DATA_URL + "banana-detection.zip", "sha1", "5de26c8fce5ccdea9f91267273464dc968d20d72",
                          "banana-detection"),
    ),)
    demo_steps = (DemoStep("banana", "banana", (ALL_CORES, "train.epochs=6")),)
    tensor_keys = ("image", "boxes")
    train_metrics = False

    def index(self, split: str, cfg: Config) -> pd.DataFrame:
        """:func:`cvtasks.formats.banana.index`; an image with more boxes than ``data.max_objects`` is an error
        naming the label file and the first row beyond the limit."""
        index = fmt.index(cfg.data.root, split, len(class_names(cfg)), skip_bad=cfg.data.skip_bad)
        limit = cfg.data.max_objects
        counts = index["boxes"].map(len)
        if (counts > limit).any():
            i = int(np.argmax(counts.to_numpy() > limit))
            raise DataFormatError(index["label_file"][i], f"image {index['path'][i]} has {counts[i]} boxes but "
                                  f"data.max_objects is {limit}; raise data.max_objects",
                                  row=int(index["rows"][i][limit]))
        return index

    def decode(self, batch: Batch, cfg: Config) -> Batch:
        """Index rows -> ``image`` (uint8 (H, W, 3) each), ``boxes`` (float32 (K, 5) normalised each), ``keep``.

        Rows whose index ``problem`` is set, and (under ``data.skip_bad``) images that fail to decode or whose
        boxes leave the image, get ``keep=False`` and are logged.
        """
        skip_bad = cfg.data.skip_bad
        images, boxes, keep = [], [], np.ones(len(batch["path"]), dtype=bool)
        rows = zip(batch["path"], batch["boxes"], batch["rows"], batch["label_file"], batch["problem"], strict=True)
        for i, (path, pixel_boxes, lines, labels, problem) in enumerate(rows):
            try:
                if problem:  # set by the index under skip_bad only
                    raise DataFormatError(path, f"skipped: {problem}")
                image, normalised = fmt.read_sample(str(path), pixel_boxes, lines, str(labels))
            except DataFormatError as exc:
                if not skip_bad:
                    raise
                log.warning("skipping bad image: %s", exc)
                image, normalised, keep[i] = PLACEHOLDER, np.asarray(pixel_boxes, np.float32), False
            images.append(image)
            boxes.append(normalised)
        return {"image": object_array(images), "boxes": object_array(boxes), "keep": keep}

    def augment_pixels(self, batch: Batch, train: bool, cfg: Config, rng: np.random.Generator) -> Batch:
        """-> ``image`` pixels (N, size, size, 3), ``boxes`` float32 (N, max_objects, 5) padded with -1; the model's
        input is the pixels in [0, 1]."""
        images, boxes = list(batch["image"]), list(batch["boxes"])
        if "keep" in batch:
            kept = np.asarray(batch["keep"], dtype=bool)
            images = [im for im, k in zip(images, kept, strict=True) if k]
            boxes = [b for b, k in zip(boxes, kept, strict=True) if k]
        image, padded = detection_batch(images, boxes, box_augment(cfg), train, rng)
        return {"image": image, "boxes": padded}

    def build_model(self, cfg: Config) -> nn.Module:
        """TinySSD, or Faster R-CNN with ``model.weights`` for ``model.name=fasterrcnn``."""
        spec = cfg.model.weights
        if model_name(cfg) == "fasterrcnn":
            if cfg.model.fasterrcnn is None:
                raise ValueError("model.name=fasterrcnn needs the model.fasterrcnn section (see banana.yaml)")
            return build_fasterrcnn(len(class_names(cfg)), cfg.model.fasterrcnn, cfg.detect, spec)
        if spec != SCRATCH:
            raise ValueError(f"model.weights={spec}: TinySSD trains from scratch; pretrained weights are for "
                             "model.name=fasterrcnn")
        return TinySSD(len(class_names(cfg)), width=cfg.model.width)

    def forward(self, model: nn.Module, batch: TensorBatch) -> det.SSDOutput | two_stage.TwoStageOutput:
        if two_stage.is_two_stage(model):
            return two_stage.forward(model, batch["image"], batch["boxes"])
        return det.forward(model, batch["image"], batch["boxes"])

    def loss(self, out: det.SSDOutput | two_stage.TwoStageOutput, batch: TensorBatch,
             cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss.cls_weight`` x class cross-entropy + ``loss.bbox_weight`` x masked offset L1; parts unweighted.
        Faster R-CNN: :func:`cvtasks.two_stage.weighted_loss`."""
        if isinstance(out, two_stage.TwoStageOutput):
            return two_stage.weighted_loss(out, cfg.loss)
        cls, bbox = det.loss_parts(out.cls_preds, out.bbox_preds, out.target)
        total = cfg.loss.cls_weight * cls + cfg.loss.bbox_weight * bbox
        return total, {"cls": cls.detach(), "bbox": bbox.detach()}

    def metric_sums(self, out: det.SSDOutput | two_stage.TwoStageOutput, batch: TensorBatch,
                    cfg: Config) -> dict[str, torch.Tensor]:
        if isinstance(out, two_stage.TwoStageOutput):
            found = out.detections
            sums = two_stage.box_sums(found, batch["boxes"], cfg.detect.score_threshold, MAP_IOU)
        else:
            sums = det.anchor_sums(out.cls_preds, out.bbox_preds, out.target)
            found = detect(out.anchors, out.cls_preds, out.bbox_preds, cfg)
        sums.update(det.ap_sums(found, batch["boxes"], len(class_names(cfg)), MAP_IOU,
                                cfg.detect.score_bins))
        return {k: v.to(batch["boxes"].device) for k, v in sums.items()}

    def summarize(self, sums: dict[str, torch.Tensor], cfg: Config) -> dict[str, float]:
        """``map50``; ``class_err`` (share of anchors with a wrong class) and ``bbox_mae`` (mean |offset error| over
        all offsets, those of background anchors counting as zero) as d2l reports them."""
        return {
            "map50": det.mean_ap(sums["tp_hist"], sums["fp_hist"], sums["gt_count"]),
            "class_err": 1.0 - float(sums["class_correct"]) / max(float(sums["class_count"]), 1.0),
            "bbox_mae": float(sums["bbox_abs_sum"]) / max(float(sums["bbox_count"]), 1.0),
        }

    def render_inputs(self, batch: Batch, cfg: Config) -> Image.Image:
        """Augmented training images with their (flipped, cropped) ground-truth boxes."""
        names = class_names(cfg)
        images = display(np.asarray(batch["image"][:RENDER_SAMPLES]))
        boxes = np.asarray(batch["boxes"][:RENDER_SAMPLES])
        tiles = [draw_truth(im, b, names) for im, b in zip(images, boxes, strict=True)]
        return grid(tiles, RENDER_COLUMNS)

    def render_predictions(self, model: nn.Module, batch: TensorBatch, cfg: Config) -> Image.Image:
        """Validation images: truth in green, detections above ``detect.score_threshold`` in red with scores.
        A two-stage model's tiles come in pairs: its RPN's best proposals, then its detections."""
        if two_stage.is_two_stage(model):
            return self.two_stage_predictions(model, batch, cfg)
        names = class_names(cfg)
        images = batch["image"][:RENDER_SAMPLES]
        with torch.no_grad():
            found = detections(model, images, cfg).cpu()
        truth = batch["boxes"][:RENDER_SAMPLES].cpu().numpy()
        tiles = [draw_detections(draw_truth(im, b, names), shown(rows, cfg, MAX_DRAWN).numpy(), names)
                 for im, b, rows in zip(display(images), truth, found, strict=True)]
        return grid(tiles, RENDER_COLUMNS)

    def two_stage_predictions(self, model: nn.Module, batch: TensorBatch, cfg: Config) -> Image.Image:
        """Per validation image: its ``PROPOSALS_DRAWN`` best RPN proposals (blue, best first) beside the truth and
        the final detections, i.e. what the RoI heads made of the proposals."""
        names, images = class_names(cfg), batch["image"][:RENDER_SAMPLES]
        with torch.no_grad():
            found = detections(model, images, cfg).cpu()
            regions = [r.cpu().numpy() for r in two_stage.proposals(model, images, PROPOSALS_DRAWN)]
        truth = batch["boxes"][:RENDER_SAMPLES].cpu().numpy()
        tiles = []
        for image, boxes, rows, proposed in zip(display(images), truth, found, regions, strict=True):
            tiles.append(draw_boxes(image, to_pixels(proposed, *image.shape[:2]), PROPOSAL_COLOUR))
            tiles.append(draw_detections(draw_truth(image, boxes, names), shown(rows, cfg, MAX_DRAWN).numpy(), names))
        return grid(tiles, RENDER_COLUMNS)

    def extra_artifacts(self, model: nn.Module, sums: dict[str, torch.Tensor], cfg: Config,
                        val_batch: TensorBatch | None = None) -> dict[str, Any]:
        """``plots/anchors_one_cell.png`` (TinySSD: the anchors of the centre cell of each feature map, over the
        first image of ``val_batch``) and ``metrics/val_ap50_per_class.json``."""
        out: dict[str, Any] = {}
        if val_batch is not None and not two_stage.is_two_stage(model):
            out["plots/anchors_one_cell.png"] = self.anchor_picture(model, val_batch["image"][:1])
        if "tp_hist" in sums:
            ap = det.average_precision(sums["tp_hist"], sums["fp_hist"], sums["gt_count"])
            out["metrics/val_ap50_per_class.json"] = {
                name: {"ap50": None if torch.isnan(v) else round(float(v), 4), "ground_truth": int(n)}
                for name, v, n in zip(class_names(cfg), ap, sums["gt_count"], strict=True)
            }
        return out

    def anchor_picture(self, model: nn.Module, x: torch.Tensor) -> Image.Image:
        """One tile per feature map: model-ready image ``x`` (1, 3, size, size) with the anchors of that map's
        centre cell (an image from the stream: a worker does not read the dataset's folder itself)."""
        image, size = display(x)[0], int(x.shape[-1])
        ssd: TinySSD = model.module if hasattr(model, "module") else model
        x = x.to(next(ssd.parameters()).device)
        with torch.no_grad():
            maps = ssd.feature_maps(x)
            scale_anchors = ssd.scale_anchors(maps)
        tiles = []
        for fmap, anchors, sizes in zip(maps, scale_anchors, ssd.sizes, strict=True):
            height, width = fmap.shape[-2:]
            per_pixel = anchors.shape[1] // (height * width)
            cell = (height // 2) * width + width // 2
            cell_anchors = anchors[0, cell * per_pixel : (cell + 1) * per_pixel].cpu().numpy()
            shapes = [(s, ssd.ratios[0]) for s in sizes] + [(sizes[0], r) for r in ssd.ratios[1:]]
            colours = list(PALETTE[:per_pixel])
            legend = [(f"size {s:g}, ratio {r:g}", colour) for (s, r), colour in zip(shapes, colours, strict=True)]
            tiles.append(captioned_tile(draw_boxes(image, to_pixels(cell_anchors, size, size), colours),
                                        [(f"{height}x{width} map, cell ({height // 2}, {width // 2})", TEXT_COLOUR),
                                         *legend]))
        return grid(tiles, len(tiles))

    def predict_files(self, model: nn.Module, paths: list[str], out_dir: Path, cfg: Config) -> list[Path]:
        """Per image ``NNN_<name>.png`` with its detections drawn, and ``detections.json``: per image its size and
        detections (class id, class, score, box [x1, y1, x2, y2] in the image's pixels), confidence
        >= ``detect.score_threshold``, at most ``MAX_PREDICTED``."""
        names, size = class_names(cfg), cfg.augment.size
        images = [decode_rgb(storage.read_bytes(p), p) for p in paths]
        inputs = torch.from_numpy(T.to_input(np.stack([resize(im, size) for im in images])))
        with torch.no_grad():
            found = detections(model.eval(), inputs, cfg)
        records, written = [], []
        for i, (path, image, rows) in enumerate(zip(paths, images, found, strict=True)):
            rows = shown(rows, cfg, MAX_PREDICTED).numpy()
            height, width = image.shape[:2]
            pixel_boxes = np.clip(to_pixels(rows[:, 2:], height, width), 0, [width, height, width, height])
            records.append({"image": str(path), "width": width, "height": height, "detections": [
                {"class_id": int(c), "class": names[int(c)], "score": round(float(s), 4),
                 "box": [round(float(v), 1) for v in box]}
                for (c, s), box in zip(rows[:, :2], pixel_boxes, strict=True)
            ]})
            picture = out_dir / f"{i:03d}_{Path(str(path)).stem}.png"
            Image.fromarray(draw_detections(image, rows, names)).save(picture)
            written.append(picture)
        json_path = out_dir / "detections.json"
        json_path.write_text(json.dumps(records, indent=2))
        return [json_path, *written]
