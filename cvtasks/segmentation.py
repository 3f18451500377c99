"""Semantic segmentation helpers: paired image/mask transforms and confusion-matrix metrics (colouring and overlays
are in :mod:`cvtasks.pictures`).

Formats: images are uint8 (H, W, 3) arrays before normalisation and float32 (N, 3, H, W) tensors after it; masks
are uint8 class indices, (H, W) before batching and (N, H, W) after it (losses widen them), with ``ignore_index``
marking pixels that loss and metrics skip. A confusion matrix ``cm`` is (K, K) with ``cm[true, predicted]`` pixel
counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cvtasks import transforms as T

#: Padding colour for images: the ImageNet mean, which normalises to exactly zero input.
PAD_COLOR = tuple(round(T.UINT8_MAX * m) for m in T.IMAGENET_MEAN)


def window_into(image: np.ndarray, mask: np.ndarray, top: int, left: int, out_image: np.ndarray,
                out_mask: np.ndarray, ignore_index: int) -> None:
    """Write the window at (``top``, ``left``) of an image and its mask into ``out_image`` (uint8 (height, width, 3))
    and ``out_mask`` ((height, width), any integer dtype); the outputs' size is the window's.

    The window may reach outside the image (negative origin, or beyond the far edge): those pixels are filled with
    ``PAD_COLOR`` in the image and ``ignore_index`` in the mask, so one primitive both crops and pads.
    """
    height, width = out_mask.shape
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + height, image.shape[0]), min(left + width, image.shape[1])
    inside = src_bottom > src_top and src_right > src_left
    if not inside or (src_bottom - src_top, src_right - src_left) != (height, width):
        T.fill_color(out_image, PAD_COLOR)
        out_mask[:] = ignore_index
    if inside:
        dst = (slice(src_top - top, src_bottom - top), slice(src_left - left, src_right - left))
        out_image[dst] = image[src_top:src_bottom, src_left:src_right]
        out_mask[dst] = mask[src_top:src_bottom, src_left:src_right]


def window(
    image: np.ndarray, mask: np.ndarray, top: int, left: int, size: tuple[int, int], ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (height, width) ``size`` window at (``top``, ``left``) of an image and its mask, as new uint8 arrays
    (padded where it leaves the image: :func:`window_into`)."""
    out_image, out_mask = np.empty((*size, 3), dtype=np.uint8), np.empty(size, dtype=np.uint8)
    window_into(image, mask, top, left, out_image, out_mask, ignore_index)
    return out_image, out_mask


def fits(shape: Sequence[int], size: tuple[int, int]) -> bool:
    """Whether an image of ``shape`` (H, W, ...) covers a (height, width) crop without padding."""
    return shape[0] >= size[0] and shape[1] >= size[1]


def random_origin(length: int, crop: int, rng: np.random.Generator) -> int:
    """Uniform crop offset along one axis; negative (random placement inside the padding) when ``length < crop``."""
    low, high = min(0, length - crop), max(0, length - crop)
    return int(rng.integers(low, high + 1))


def random_crop_origin(shape: Sequence[int], size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a uniformly random (height, width) crop of an image of ``shape`` (d2l's ``voc_rand_crop``)."""
    return random_origin(shape[0], size[0], rng), random_origin(shape[1], size[1], rng)


def center_crop_origin(shape: Sequence[int], size: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centred (height, width) crop, padding evenly where the image is smaller."""
    return (shape[0] - size[0]) // 2, (shape[1] - size[1]) // 2


def random_crop_pair(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int], rng: np.random.Generator, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same random (height, width) crop rectangle of image and mask (d2l's ``voc_rand_crop``); pads if small."""
    return window(image, mask, *random_crop_origin(image.shape, size, rng), size, ignore_index)


def center_crop_pair(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int], ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic centred (height, width) crop of image and mask, padding evenly where the image is smaller."""
    return window(image, mask, *center_crop_origin(image.shape, size), size, ignore_index)


#: Per-channel (mean, std) of the segmentation model's inputs: the FCN's backbone is torchvision's ImageNet ResNet-18.
INPUT_STATS = (T.IMAGENET_MEAN, T.IMAGENET_STD)


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) standardised with :data:`INPUT_STATS`."""
    return T.to_input(images, *INPUT_STATS)


def paired_batch(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: tuple[int, int], *, train: bool,
    rng: np.random.Generator, hflip_prob: float, ignore_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Variable-size uint8 images (H, W, 3) and masks (H, W) -> uint8 crops (N, h, w, 3) and masks (N, h, w).

    ``train``: the same random crop rectangle and the same horizontal flip (with ``hflip_prob``) for image and
    mask. Otherwise a deterministic centre crop. Either way, images smaller than ``size`` are padded
    (``PAD_COLOR`` / ``ignore_index``), so every batch stacks.

    Each crop is written into the batch arrays, and a flipped one mirrored there in place
    (:func:`cvtasks.transforms.mirror_columns`); VOC's 320x480 crops make copies the main cost of this step.
    """
    if not 0 <= ignore_index <= T.UINT8_MAX:
        raise ValueError(f"ignore_index {ignore_index} does not fit the uint8 masks (0..{T.UINT8_MAX})")
    height, width = size
    crops = np.empty((len(images), height, width, 3), dtype=np.uint8)
    out_masks = np.empty((len(images), height, width), dtype=np.uint8)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if train:
            top, left = random_crop_origin(image.shape, size, rng)
            mirrored = rng.random() < hflip_prob
        else:
            (top, left), mirrored = center_crop_origin(image.shape, size), False
        window_into(image, mask, top, left, crops[i], out_masks[i], ignore_index)
        if mirrored:
            T.mirror_columns(crops[i])
            T.mirror_columns(out_masks[i])
    return crops, out_masks


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) float64 counts ``cm[true, predicted]`` over pixels whose target is not ``ignore_index``.

    ``pred`` and ``target`` are integer class maps of the same shape, e.g. (N, H, W).
    """
    valid = target != ignore_index
    codes = target[valid].long() * num_classes + pred[valid].long()
    counts = torch.bincount(codes, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).to(torch.float64)


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Share of labelled pixels predicted right (d2l's "test acc" for segmentation)."""
    total = float(cm.sum())
    return float(torch.diagonal(cm).sum()) / total if total else float("nan")


def class_iou(cm: torch.Tensor) -> torch.Tensor:
    """Per-class intersection over union, (K,) float64; NaN for classes absent from both truth and prediction."""
    cm = cm.to(torch.float64)
    intersection = torch.diagonal(cm)
    union = cm.sum(0) + cm.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes present in the truth or the prediction (a predicted-only class scores 0)."""
    return float(torch.nanmean(class_iou(cm)))


def constant_prediction_confusion(cm: torch.Tensor, class_index: int) -> torch.Tensor:
    """The confusion matrix a model predicting ``class_index`` for every pixel would get on the same truth."""
    constant = torch.zeros_like(cm)
    constant[:, class_index] = cm.sum(1)
    return constant


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Class masks (H, W) uint8 for uint8 (H, W, 3) images of any size, one forward pass per image.

    ``model`` maps ImageNet-normalised (1, 3, H, W) input to (1, K, H, W) class scores (e.g. an FCN). It is put in
    eval mode and run on the device of its parameters.
    """
    model.eval()
    device = next(model.parameters()).device
    masks = []
    for image in images:
        x = torch.from_numpy(normalize_images(np.asarray(image)[None])).to(device)
        masks.append(model(x).argmax(1)[0].to(torch.uint8).cpu().numpy())
    return masks
