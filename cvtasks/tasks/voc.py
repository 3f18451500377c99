"""Pascal VOC2012 semantic segmentation with an FCN on ResNet-18 (d2l 13.9-13.11).

Images smaller than ``augment.crop_size`` (``augment.small``):
    ``filter``  d2l's behaviour: ``decode`` sets ``keep=False`` for them, so the pipeline drops them (both splits)
                and logs how many
    ``pad``     kept; training crops place them at a random offset inside the crop, evaluation centres them, and
                the padding is ``IGNORE_INDEX`` in the mask (the mean colour in the image)
Evaluation uses a deterministic centre crop of ``crop_size`` so batches stack.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cvtasks import pictures, storage
from cvtasks import segmentation as seg
from cvtasks.catalog import ALL_CORES, D2L_DATA_URL, Dataset, DemoStep, Download
from cvtasks.errors import DataFormatError
from cvtasks.formats import voc
from cvtasks.images import decode_rgb, object_array
from cvtasks.models.fcn import FCN, build_fcn
from cvtasks.settings import Section
from cvtasks.tasks.base import Batch, Config, Task, TensorBatch

log = logging.getLogger(__name__)

SMALL_POLICIES = ("filter", "pad")
BACKGROUND = 0
#: Samples drawn by render_inputs (RENDER_COLUMNS per row) and rows drawn by render_predictions.
RENDER_INPUTS = 8
RENDER_COLUMNS = 4
RENDER_PREDICTIONS = 4


@dataclass(frozen=True)
class VocModel(Section):
    weights: str  # the FCN's ResNet-18 backbone: scratch | imagenet | a state-dict file | runs:/<id>/model
    head_lr_mult: float  # the new 1x1 classifier and upsampling learn at this multiple of optim.lr


@dataclass(frozen=True)
class VocAugment(Section):
    crop_size: list[int]  # [height, width] of the random (train) / centre (val) crop
    small: str  # images smaller than the crop: filter (drop) | pad
    hflip: float  # probability of a horizontal flip of image and mask


def crop_size(cfg: Config) -> tuple[int, int]:
    height, width = cfg.augment.crop_size
    if height <= 0 or width <= 0:
        raise ValueError(f"augment.crop_size must be two positive ints [height, width], got {[height, width]}")
    return height, width


def small_policy(cfg: Config) -> str:
    policy = cfg.augment.small
    if policy not in SMALL_POLICIES:
        raise ValueError(f'Unknown augment.small policy "{policy}": use {" or ".join(SMALL_POLICIES)}')
    return policy


class VocTask(Task):
    name = "voc"
    ragged_decode = True  # scenes of any size
    metric = "val_miou"
    sections = {"model": VocModel, "augment": VocAugment}
    datasets = (Dataset(
        "voc", "VOCdevkit", demo_writer="cvtasks.demo.voc:write", demo_cost=1, aliases=("voc2012",),
        download=Download(D2L_DATA_URL + "VOCtrainval_11-May-2012.tar", "sha1",
                          "4e443f8a2eca6b1dac8a6c57641b67dd40621a49", "VOCdevkit/VOC2012"),
    ),)
    demo_steps = (DemoStep("voc", "voc", (ALL_CORES, "train.epochs=6")),)
    tensor_keys = ("image", "mask")

    def index(self, split: str, cfg: Config) -> pd.DataFrame:
        return voc.index(cfg.data.root, split)

    def decode(self, batch: Batch, cfg: Config) -> Batch:
        """Paths -> ``image`` (uint8 (H, W, 3) each), ``mask`` (uint8 (H, W) each) object arrays and ``keep``.

        ``keep`` is False for unreadable samples under ``data.skip_bad`` (tiny placeholders stand in) and, with
        ``augment.small: filter``, for images smaller than the crop.
        """
        size, policy = crop_size(cfg), small_policy(cfg)
        skip_bad = cfg.data.skip_bad
        images, masks, keep = [], [], []
        small = bad = 0
        for image_path, mask_path in zip(batch["image_path"], batch["mask_path"], strict=True):
            try:
                image, mask = voc.read_sample(str(image_path), str(mask_path))
            except DataFormatError as exc:
                if not skip_bad:
                    raise
                log.warning("skipping bad sample: %s", exc)
                bad += 1
                images.append(np.zeros((1, 1, 3), dtype=np.uint8))
                masks.append(np.full((1, 1), voc.IGNORE_INDEX, dtype=np.uint8))
                keep.append(False)
                continue
            fits = seg.fits(image.shape, size)
            small += not fits
            images.append(image)
            masks.append(mask)
            keep.append(fits or policy == "pad")
        if small:
            action = "dropping" if policy == "filter" else "padding"
            log.info("%s %d of %d images smaller than the %dx%d crop (augment.small=%s)", action, small,
                     len(keep), size[0], size[1], policy)
        return {"image": object_array(images), "mask": object_array(masks), "keep": np.asarray(keep, dtype=bool)}

    def augment_pixels(self, batch: Batch, train: bool, cfg: Config, rng: np.random.Generator) -> Batch:
        """-> ``image`` uint8 crops (N, h, w, 3), ``mask`` uint8 (N, h, w); (h, w) = crop_size. The model's input is
        the crops ImageNet-normalised (:meth:`input_stats`).

        Rows with ``keep=False`` are dropped here too, so decode output can be augmented directly.
        """
        images, masks = list(batch["image"]), list(batch["mask"])
        if "keep" in batch:
            kept = np.asarray(batch["keep"], dtype=bool)
            images = [im for im, k in zip(images, kept, strict=True) if k]
            masks = [m for m, k in zip(masks, kept, strict=True) if k]
        image, mask = seg.paired_batch(images, masks, crop_size(cfg), train=train, rng=rng,
                                       hflip_prob=cfg.augment.hflip, ignore_index=voc.IGNORE_INDEX)
        return {"image": image, "mask": mask}

    def input_stats(self, cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return seg.INPUT_STATS

    def build_model(self, cfg: Config) -> nn.Module:
        return build_fcn(voc.NUM_CLASSES, cfg.model.weights)

    def param_groups(self, model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
        """Backbone at the base lr; the new 1x1 classifier and upsampling at ``model.head_lr_mult`` times it."""
        fcn: FCN = model.module if hasattr(model, "module") else model
        return [
            {"params": list(fcn.backbone.parameters()), "lr_mult": 1.0},
            {"params": fcn.head_parameters(), "lr_mult": cfg.model.head_lr_mult},
        ]

    def loss(self, out: torch.Tensor, batch: TensorBatch, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pixel cross-entropy averaged over the non-ignored pixels of the batch (zero when there are none)."""
        target = batch["mask"]
        if not bool((target != voc.IGNORE_INDEX).any()):
            return out.sum() * 0.0, {}
        return F.cross_entropy(out.float(), target.long(), ignore_index=voc.IGNORE_INDEX), {}

    def metric_sums(self, out: torch.Tensor, batch: TensorBatch, cfg: Config) -> dict[str, torch.Tensor]:
        """``confusion``: (21, 21) ``cm[true, predicted]`` over labelled pixels; ``ignored_pixels``: count of 255s."""
        target = batch["mask"]
        return {
            "confusion": seg.confusion_matrix(out.argmax(1), target, voc.NUM_CLASSES, voc.IGNORE_INDEX),
            "ignored_pixels": (target == voc.IGNORE_INDEX).sum().to(torch.float64),
        }

    def summarize(self, sums: dict[str, torch.Tensor], cfg: Config) -> dict[str, float]:
        """``pixel_acc`` (d2l's accuracy), ``miou``, ``background_miou`` (the mIoU of predicting background
        everywhere: the floor to beat), ``ignored_share`` (share of pixels left out as boundary)."""
        cm = sums["confusion"]
        labelled = float(cm.sum())
        return {
            "pixel_acc": seg.pixel_accuracy(cm),
            "miou": seg.mean_iou(cm),
            "background_miou": background_miou(cm),
            "ignored_share": float(sums["ignored_pixels"]) / max(labelled + float(sums["ignored_pixels"]), 1.0),
        }

    def render_inputs(self, batch: Batch, cfg: Config) -> Image.Image:
        images = pictures.denormalize(np.asarray(batch["image"][:RENDER_INPUTS]))
        masks = np.asarray(batch["mask"][:RENDER_INPUTS])
        tiles = [pictures.overlay(image, mask, voc.voc_palette()) for image, mask in zip(images, masks, strict=True)]
        return pictures.grid(tiles, RENDER_COLUMNS)

    def render_predictions(self, model: nn.Module, batch: TensorBatch, cfg: Config) -> Image.Image:
        """Rows of input | prediction | truth (VOC colours; cream = ignored boundary). ``model`` in eval mode."""
        palette = voc.voc_palette()
        with torch.no_grad():
            pred = model(batch["image"][:RENDER_PREDICTIONS]).argmax(1).cpu().numpy()
        images = pictures.denormalize(batch["image"][:RENDER_PREDICTIONS])
        truth = batch["mask"][:RENDER_PREDICTIONS].cpu().numpy()
        tiles = [tile for image, p, t in zip(images, pred, truth, strict=True)
                 for tile in (image, pictures.colorize(p, palette), pictures.colorize(t, palette))]
        return pictures.grid(tiles, columns=3)  # input | prediction | truth

    def extra_artifacts(self, model: nn.Module, sums: dict[str, torch.Tensor], cfg: Config,
                        val_batch: TensorBatch | None = None) -> dict[str, Any]:
        """``metrics/val_per_class_iou.csv`` and ``metrics/val_confusion.json`` from the last validation pass."""
        if "confusion" not in sums:
            return {}
        cm = sums["confusion"].to(torch.float64)
        return {
            "metrics/val_per_class_iou.csv": per_class_iou_csv(cm),
            "metrics/val_confusion.json": {"classes": list(voc.VOC_CLASSES),
                                           "rows_true_cols_predicted": cm.long().tolist()},
        }

    def predict_files(self, model: nn.Module, paths: list[str], out_dir: Path, cfg: Config) -> list[Path]:
        """Per image, at its own size: ``<name>_mask.png`` (VOC palette PNG of the predicted class indices, readable
        as a VOC mask) and ``<name>_overlay.png`` (class colours over the image); plus ``predictions.json`` with the
        share of pixels per predicted class. Images of any size: the FCN pads to a multiple of 32 and crops back.
        """
        records, written = [], []
        for path, stem in zip(paths, unique_stems(paths), strict=True):
            image = decode_rgb(storage.read_bytes(path), path)
            mask = seg.predict(model, [image])[0]
            mask_path = voc.write_mask(out_dir / f"{stem}_mask.png", mask)
            overlay_path = voc.write_overlay(out_dir / f"{stem}_overlay.png", image, mask)
            counts = Counter(mask.ravel().tolist())
            shares = {voc.VOC_CLASSES[k]: round(n / mask.size, 4) for k, n in sorted(counts.items())}
            records.append({"image": str(path), "mask": mask_path.name, "overlay": overlay_path.name,
                            "class_pixel_share": shares})
            written += [mask_path, overlay_path]
        json_path = out_dir / "predictions.json"
        json_path.write_text(json.dumps(records, indent=2))
        return [*written, json_path]


def unique_stems(paths: list[str]) -> list[str]:
    """File stems to name outputs by; a stem seen before gets ``-2``, ``-3``... (``a/x.jpg``, ``b/x.jpg``)."""
    seen: Counter[str] = Counter()
    stems = []
    for path in paths:
        stem = Path(str(path).rstrip("/")).stem
        seen[stem] += 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def background_miou(cm: torch.Tensor) -> float:
    """Mean IoU of predicting background for every pixel, on the truth summarised by confusion matrix ``cm``."""
    return seg.mean_iou(seg.constant_prediction_confusion(cm, BACKGROUND))


def per_class_iou_csv(cm: torch.Tensor) -> str:
    """CSV text: class index, name, IoU (empty when the class is in neither truth nor prediction), pixel counts."""
    iou = seg.class_iou(cm)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class_index", "class", "iou", "true_pixels", "predicted_pixels"])
    for k, name in enumerate(voc.VOC_CLASSES):
        value = "" if torch.isnan(iou[k]) else f"{float(iou[k]):.4f}"
        writer.writerow([k, name, value, int(cm[k].sum()), int(cm[:, k].sum())])
    return buf.getvalue()
