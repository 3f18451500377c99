"""Augmentation of images together with their bounding boxes, for detection batches in Ray Data.

Boxes are float32 (K, 5) rows (class, x1, y1, x2, y2), corners as fractions of the image's width and height
(cvtasks.boxes conventions), one array per image. A batch leaves :func:`detection_batch` as ``image`` pixels
(N, size, size, 3), uint8 (float32 in [0, 1] after colour jitter), and ``boxes`` float32 (N, max_objects, 5),
padded with rows of ``PAD_VALUE`` (class -1: d2l's padding, ignored by cvtasks.boxes.multibox_target). The model's
input is the pixels / 255 (``cvtasks.transforms.to_input`` / ``pixels_to_input`` without standardisation).

Steps for training batches, in order: optional random crop (``crop`` probability), resize, horizontal flip
(``hflip`` probability), colour jitter (cvtasks.transforms.color_jitter). Evaluation batches are only resized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cvtasks import transforms as T

PAD_VALUE = -1.0
BOX_FIELDS = 5
#: Crops tried per image to find one that keeps at least one box; after that the image is left uncropped.
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class BoxAugment:
    """Settings of a detection batch (config ``augment`` section plus ``data.max_objects``)."""

    size: int  # side of the square model input
    max_objects: int  # boxes per image after padding
    hflip: float = 0.0  # probability of a horizontal flip
    crop: float = 0.0  # probability of a random crop
    crop_scale: tuple[float, float] = (0.3, 1.0)  # crop area as a share of the image
    crop_ratio: tuple[float, float] = (0.5, 2.0)  # crop width / height
    crop_min_visible: float = 0.5  # a box survives a crop when at least this share of its area is inside
    color: dict[str, float] = field(default_factory=dict)  # ColorJitter strengths (brightness, contrast, ...)


def hflip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Mirror boxes (K, 5) left-right in a unit-wide image: x1' = 1 - x2, x2' = 1 - x1."""
    out = np.array(boxes, dtype=np.float32, copy=True)
    out[:, 1], out[:, 3] = 1.0 - boxes[:, 3], 1.0 - boxes[:, 1]
    return out


def crop_boxes(boxes: np.ndarray, window: Sequence[float], min_visible: float) -> np.ndarray:
    """Boxes (K, 5) of an image -> the boxes of its crop ``window`` (x1, y1, x2, y2 as fractions of the image).

    A box is kept when at least ``min_visible`` of its area lies inside the window; kept boxes are clipped to the
    window and expressed as fractions of it. Dropped boxes are removed (the result may have fewer rows).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, BOX_FIELDS)
    wx1, wy1, wx2, wy2 = (float(v) for v in window)
    clipped = boxes.copy()
    clipped[:, [1, 3]] = np.clip(boxes[:, [1, 3]], wx1, wx2)
    clipped[:, [2, 4]] = np.clip(boxes[:, [2, 4]], wy1, wy2)
    area = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    inside = (clipped[:, 3] - clipped[:, 1]) * (clipped[:, 4] - clipped[:, 2])
    kept = clipped[inside >= min_visible * area]
    kept[:, [1, 3]] = (kept[:, [1, 3]] - wx1) / (wx2 - wx1)
    kept[:, [2, 4]] = (kept[:, [2, 4]] - wy1) / (wy2 - wy1)
    return kept


def random_crop(image: np.ndarray, boxes: np.ndarray, aug: BoxAugment,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random crop of ``image`` (uint8 (H, W, 3)) that keeps at least one of its boxes, resized to ``aug.size``.

    Crops are drawn as torchvision's RandomResizedCrop (area share ``crop_scale``, aspect ``crop_ratio``); without a
    crop keeping a box in ``CROP_ATTEMPTS`` tries, the whole image is used.
    """
    height, width = image.shape[:2]
    for _ in range(CROP_ATTEMPTS):
        top, left, h, w = T.random_resized_crop_box(height, width, rng, aug.crop_scale, aug.crop_ratio)
        window = (left / width, top / height, (left + w) / width, (top + h) / height)
        kept = crop_boxes(boxes, window, aug.crop_min_visible)
        if len(kept):
            return T.resized_crop(image, (top, left, h, w), aug.size), kept
    return resize(image, aug.size), boxes


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3), bilinear; boxes in fractions need no change."""
    if image.shape[:2] == (size, size):
        return image
    return T.resized_crop(image, (0, 0, image.shape[0], image.shape[1]), size)


def pad_boxes(boxes: Sequence[np.ndarray], max_objects: int) -> np.ndarray:
    """Per-image boxes (K_i, 5) -> float32 (N, max_objects, 5), missing rows filled with ``PAD_VALUE``."""
    out = np.full((len(boxes), max_objects, BOX_FIELDS), PAD_VALUE, dtype=np.float32)
    for i, b in enumerate(boxes):
        b = np.asarray(b, dtype=np.float32).reshape(-1, BOX_FIELDS)
        if len(b) > max_objects:
            raise ValueError(f"an image has {len(b)} boxes but data.max_objects is {max_objects}: raise it")
        out[i, : len(b)] = b
    return out


def detection_batch(images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], aug: BoxAugment, train: bool,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (H_i, W_i, 3) and their boxes -> (pixels (N, size, size, 3), float32 (N, max_objects, 5))."""
    out_images, out_boxes, mirrored = [], [], []
    for i, (image, b) in enumerate(zip(images, boxes, strict=True)):
        b = np.asarray(b, dtype=np.float32).reshape(-1, BOX_FIELDS)
        if train and aug.crop > 0 and rng.random() < aug.crop:
            image, b = random_crop(image, b, aug, rng)
        else:
            image = resize(image, aug.size)
        if train and rng.random() < aug.hflip:
            mirrored.append(i)
            b = hflip_boxes(b)
        out_images.append(image)
        out_boxes.append(b)
    pixels = np.stack(out_images)
    for i in mirrored:  # in the batch's own array: the images above may be views of the input
        T.mirror_columns(pixels[i])
    if train and any(v > 0 for v in aug.color.values()):
        pixels = T.color_jitter(T.to_unit_float(pixels), rng, **aug.color)
    return pixels, pad_boxes(out_boxes, aug.max_objects)
