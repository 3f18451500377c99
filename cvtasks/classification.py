"""What the image-classification tasks (CIFAR-10, hotdog) share: the transform pipeline read from config,
cross-entropy loss, additive accuracy statistics, and pictures labelled with true and predicted classes.

Batches: decoded ``image`` is uint8 (N, H, W, 3) or an object array of uint8 (H, W, 3) of varying sizes, ``label``
int64 (N,). Augmented ``image`` pixels are (N, size, size, 3), uint8 or float32 after colour jitter; model-ready
``image`` is float32 (N, 3, size, size), ``label`` int64 (N,). Model output: scores (N, K).

Config ``augment`` section (both tasks)::

    policy        a name from cvtasks.transforms.POLICIES; random steps for training batches
    size          side of the model input
    resize_size   without a crop step, the shorter side is resized to this, then centre-cropped to ``size``
    crop_scale    RandomResizedCrop area share [min, max]; crop_ratio: its width / height [min, max]
    color         ColorJitter strengths {brightness, contrast, saturation, hue}
    normalize     "imagenet" (pretrained torchvision backbones) or "none" (inputs stay in [0, 1])

Metrics: ``metric_sums`` gives ``correct``, ``count`` and the ``confusion`` matrix (K, K) (rows true, columns
predicted); ``summarize`` returns ``{"acc": ...}``, which the loop reports as ``train_acc`` / ``val_acc``. The mean
loss is summed by the loop itself (``train_loss`` / ``val_loss``).
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cvtasks import pictures, storage
from cvtasks import transforms as T
from cvtasks.errors import DataFormatError
from cvtasks.images import decode_rgb
from cvtasks.settings import DataSection, Section
from cvtasks.tasks.base import Batch, Config, Task, TensorBatch

log = logging.getLogger(__name__)

#: Mean and std of each ``augment.normalize`` option (None: no normalisation).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "imagenet": (T.IMAGENET_MEAN, T.IMAGENET_STD),
    "none": None,
}
RENDER_SAMPLES = 16
RENDER_COLUMNS = 8
CORRECT_COLOUR = (0, 128, 0)
WRONG_COLOUR = (200, 0, 0)


@dataclass(frozen=True)
class ClassificationData(DataSection):
    #: class names in label order, put here by the driver (``resolve_for_workers``) or a logged model; empty: read
    #: from the dataset
    class_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClassificationAugment(Section):
    policy: str
    size: int
    resize_size: int
    crop_scale: list[float]
    crop_ratio: list[float]
    color: dict[str, float]
    normalize: str


def normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    name = cfg.augment.normalize
    if name not in NORMALIZATIONS:
        raise ValueError(f'Unknown augment.normalize "{name}": use {" or ".join(NORMALIZATIONS)}')
    return NORMALIZATIONS[name]


def transform_pixels(images: np.ndarray | Sequence[np.ndarray], train: bool, cfg: Config,
                     rng: np.random.Generator) -> np.ndarray:
    """Decoded uint8 images -> the augmented pixels (N, size, size, 3) as ``cfg.augment`` says (random steps only
    if ``train``): uint8, or float32 in [0, 1] after colour jitter."""
    aug: ClassificationAugment = cfg.augment
    policy = T.get_policy(aug.policy) if train else T.EVAL_POLICY
    if policy.crop:
        pixels = T.random_resized_crop(images, aug.size, rng, scale=aug.crop_scale, ratio=aug.crop_ratio)
    else:
        pixels = T.resize_center_crop(images, aug.resize_size, aug.size)
    if policy.flip:
        pixels = T.hflip(pixels, rng)
    if policy.color:
        pixels = T.color_jitter(T.to_unit_float(pixels), rng, **aug.color)
    return pixels


def display_images(images: np.ndarray | torch.Tensor, cfg: Config) -> np.ndarray:
    """Model inputs float (N, 3, H, W) -> uint8 (N, H, W, 3), undoing ``augment.normalize``."""
    stats = normalization(cfg)
    return pictures.denormalize(images, *(stats if stats is not None else (None, None)))


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) float counts: ``cm[true, predicted]``."""
    flat = target.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).float()


class ClassificationTask(Task):
    """Base of single-label classification tasks; subclasses read their format and build their model."""

    metric = "val_acc"
    sections = {"data": ClassificationData, "augment": ClassificationAugment}

    def __init__(self) -> None:
        self._class_names: dict[str, list[str]] = {}

    @abstractmethod
    def read_class_names(self, cfg: Config) -> list[str]:
        """Class names in label order, read from the dataset ``cfg`` points at."""

    def class_names(self, cfg: Config) -> list[str]:
        """``data.class_names`` where the config carries them (a model rebuilt for prediction away from its training
        data), else :meth:`read_class_names`, read once per dataset root."""
        if cfg.data.class_names:
            return list(cfg.data.class_names)
        key = f"{cfg.data.root}|{getattr(cfg.data, 'dataset', '')}"
        if key not in self._class_names:
            self._class_names[key] = self.read_class_names(cfg)
        return self._class_names[key]

    def augment_pixels(self, batch: Batch, train: bool, cfg: Config, rng: np.random.Generator) -> Batch:
        return {"image": transform_pixels(batch["image"], train, cfg, rng),
                "label": np.asarray(batch["label"], dtype=np.int64)}

    def input_stats(self, cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return normalization(cfg)

    def loss(self, out: torch.Tensor, batch: TensorBatch, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(out, batch["label"]), {}

    def metric_sums(self, out: torch.Tensor, batch: TensorBatch, cfg: Config) -> dict[str, torch.Tensor]:
        pred, label = out.argmax(dim=1), batch["label"]
        return {
            "correct": (pred == label).sum().float(),
            "count": torch.tensor(float(len(label)), device=out.device),
            "confusion": confusion_matrix(pred, label, out.shape[1]),
        }

    def summarize(self, sums: dict[str, torch.Tensor], cfg: Config) -> dict[str, float]:
        return {"acc": float(sums["correct"]) / max(float(sums["count"]), 1.0)}

    def render_inputs(self, batch: Batch, cfg: Config) -> Image.Image:
        """Augmented training samples (normalisation undone) captioned with their class."""
        names = self.class_names(cfg)
        images = display_images(np.asarray(batch["image"][:RENDER_SAMPLES]), cfg)
        labels = np.asarray(batch["label"][:RENDER_SAMPLES])
        return pictures.grid([pictures.captioned_tile(img, [(names[y], pictures.TEXT_COLOUR)])
                              for img, y in zip(images, labels, strict=True)], RENDER_COLUMNS)

    def render_predictions(self, model: nn.Module, batch: TensorBatch, cfg: Config) -> Image.Image:
        """Validation samples captioned "true: ..." and "pred: ..." (green when right, red when wrong)."""
        names = self.class_names(cfg)
        inputs = batch["image"][:RENDER_SAMPLES]
        with torch.no_grad():
            pred = model(inputs).argmax(dim=1).cpu().numpy()
        truth = batch["label"][:RENDER_SAMPLES].cpu().numpy()
        tiles = [
            pictures.captioned_tile(img, [(f"true: {names[t]}", pictures.TEXT_COLOUR),
                                          (f"pred: {names[p]}", CORRECT_COLOUR if p == t else WRONG_COLOUR)])
            for img, t, p in zip(display_images(inputs, cfg), truth, pred, strict=True)
        ]
        return pictures.grid(tiles, RENDER_COLUMNS)

    def resolve_for_workers(self, cfg: Config) -> Config:
        """Class names in the config (``data.class_names``): models are built from them on every worker."""
        return cfg.with_values({"data.class_names": self.class_names(cfg)})

    def extra_artifacts(self, model: nn.Module, sums: dict[str, torch.Tensor], cfg: Config,
                        val_batch: TensorBatch | None = None) -> dict[str, Any]:
        """``metrics/val_confusion.json``: class names, the confusion matrix and per-class accuracy."""
        if "confusion" not in sums:
            return {}
        cm = sums["confusion"].to(torch.float64)
        per_class = cm.diagonal() / cm.sum(dim=1).clamp(min=1.0)
        return {"metrics/val_confusion.json": {
            "classes": self.class_names(cfg),
            "rows_true_cols_predicted": cm.long().tolist(),
            "per_class_acc": [round(float(v), 4) for v in per_class],
        }}

    def predict_files(self, model: nn.Module, paths: list[str], out_dir: Path, cfg: Config) -> list[Path]:
        """``predictions.json`` (top class and probability per image) and a captioned grid ``predictions.png``."""
        try:
            names = self.class_names(cfg)
        except (OSError, DataFormatError) as exc:
            log.warning("class names unavailable (%s): predictions name class indices", exc)
            names = None
        images = [decode_rgb(storage.read_bytes(p), p) for p in paths]
        pixels = transform_pixels(images, False, cfg, np.random.default_rng(0))
        inputs = torch.from_numpy(self.model_inputs(pixels, cfg))
        probs = torch.softmax(model(inputs).float(), dim=1)
        score, pred = probs.max(dim=1)
        records, tiles = [], []
        for path, p, s, shown in zip(paths, pred.tolist(), score.tolist(), display_images(inputs, cfg), strict=True):
            label = names[p] if names else str(p)
            records.append({"image": str(path), "class_id": p, "class": label, "probability": round(s, 4)})
            tiles.append(pictures.captioned_tile(shown, [(f"{label} {s:.2f}", pictures.TEXT_COLOUR)]))
        json_path, grid_path = out_dir / "predictions.json", out_dir / "predictions.png"
        json_path.write_text(json.dumps(records, indent=2))
        pictures.grid(tiles, RENDER_COLUMNS).save(grid_path)
        return [json_path, grid_path]
