"""Batch image transforms in numpy, the torchvision way, and augmentation policies looked up by name.

Formats: ``images`` are uint8 (N, H, W, 3) arrays, or a sequence of uint8 (H, W, 3) arrays of varying sizes where
noted. Photometric steps work on float32 (N, H, W, 3) in [0, 1] (:func:`to_unit_float`); :func:`to_input` gives the
model's float32 (N, 3, H, W). Random steps draw from the ``np.random.Generator`` they are given.

Augmented *pixels* (N, H, W, 3), uint8 where every step kept them uint8 (crops, flips, resizes, pads), float32 in
[0, 1] after photometric steps, are what a pipeline moves between processes; :func:`pixels_to_input` turns a tensor
of them into the model's input where the model runs (on its device): a quarter of float32's bytes to copy and ship.

Geometric steps that resize go image by image through PIL with bilinear interpolation, exactly as torchvision's
transforms do on PIL images; flips and colour jitter are vectorised over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

#: ImageNet channel statistics that torchvision's pretrained backbones expect (RGB, in [0, 1] units).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UINT8_MAX = 255
#: ITU-R 601-2 luma weights, as torchvision's ``rgb_to_grayscale``.
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
#: torchvision's RandomResizedCrop defaults: share of the image area, and width / height.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Random tries for a crop inside the image before falling back to a centre crop (torchvision's number).
CROP_ATTEMPTS = 10

Box = tuple[int, int, int, int]  # top, left, height, width


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


#: torch runs an elementwise operation on its thread pool above this many values (ATen's GRAIN_SIZE).
TORCH_PARALLEL_GRAIN = 32768


def mirror_columns(array: np.ndarray) -> None:
    """Mirror a writable (H, W) or (H, W, C) array left-right in place.

    Through torch's flip: numpy copies through a negative stride one value at a time, 5x slower on VOC's 320x480
    crops (530 against 98 us) and on 224 px images. The flip goes a band of rows at a time, each under torch's
    parallel grain, so that it runs on the calling thread: on torch's thread pool, with the other core busy (Ray
    Data's threads, other processes), a 320x480 flip took 447 us against 44 us on idle cores. For a batch of small
    images, one numpy copy (:func:`hflip`) is cheaper: a call per image, each releasing and taking back the GIL,
    made CIFAR-10's epoch augmented in the training worker twice as long, its GIL shared with Ray Data's prefetch
    thread.
    """
    pixels = torch.from_numpy(array)
    rows = max(1, (TORCH_PARALLEL_GRAIN - 1) // max(1, math.prod(array.shape[1:])))
    for start in range(0, len(array), rows):
        band = pixels[start:start + rows]
        band.copy_(band.flip(1))


def fill_color(out: np.ndarray, color: Sequence[int]) -> None:
    """Set every pixel of ``out`` (H, W, C), H >= 1, to ``color``: the first row by broadcasting, the others copied
    from it (numpy broadcasting a C-vector over the whole array goes value by value: 513 against 11 us on a 320x480
    crop)."""
    out[:1] = color
    out[1:] = out[:1]


def hflip(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror each image of (N, H, W, C) left-right with probability ``p``; a new array."""
    out = images.copy()
    flip = rng.random(len(images)) < p
    out[flip] = images[flip, :, ::-1]  # one copy a batch: per-image calls (mirror_columns) waited for the GIL
    return out


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 in [0, 1]."""
    return images.astype(np.float32) / UINT8_MAX


def to_input(images: np.ndarray, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> np.ndarray:
    """uint8 (N, H, W, C), or float in [0, 1] -> the model's contiguous float32 (N, C, H, W), standardised as
    ``(x - mean) / std`` per channel unless ``mean`` is None.

    Scaling to [0, 1] and standardising fold into one divide and add per channel, written straight into the NCHW
    output: two passes over it, where scaling, standardising and transposing one after another make five
    full-size temporaries (the largest cost of VOC's augment, whose crops are 320x480). Without ``mean``, uint8 input
    gives exactly ``ToTensor``'s ``x / 255``.
    """
    n, height, width, channels = images.shape
    divisor = np.full(channels, UINT8_MAX if images.dtype == np.uint8 else 1.0)
    shift = np.zeros(channels)
    if mean is not None:
        std_ = np.asarray(std, np.float64)
        divisor, shift = divisor * std_, -np.asarray(mean, np.float64) / std_
    out = np.empty((n, channels, height, width), np.float32)
    for c in range(channels):
        np.divide(images[..., c], np.float32(divisor[c]), out=out[:, c])
        if shift[c]:
            out[:, c] += np.float32(shift[c])
    return out


def pixels_to_input(images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """:func:`to_input` for a tensor of pixels, on the tensor's device: uint8 (N, H, W, C), or float in [0, 1] ->
    float32 (N, C, H, W) in ``memory_format``, ``(x - mean) / std`` per channel unless ``mean`` is None; the same
    values as :func:`to_input`, to the bit.

    On the CPU this is :func:`to_input` itself: numpy's per-channel strided divide beat every torch formulation
    measured on 2 cores (32 VOC crops of 320x480: 17 ms against 25-90 ms); elsewhere :func:`tensor_to_input`.
    """
    if images.device.type == "cpu":
        return torch.from_numpy(to_input(images.numpy(), mean, std)).contiguous(memory_format=memory_format)
    return tensor_to_input(images, mean, std, memory_format)


def tensor_to_input(images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """:func:`pixels_to_input` in torch operations, for pixels on an accelerator: the dtype conversion and the
    transpose are one copy, then one divide and one add over the batch, as :func:`to_input` does per channel."""
    n, height, width, channels = images.shape
    out = torch.empty((n, channels, height, width), dtype=torch.float32, device=images.device,
                      memory_format=memory_format)
    out.copy_(images.permute(0, 3, 1, 2))
    divisor = torch.full((channels,), UINT8_MAX if images.dtype == torch.uint8 else 1.0, dtype=torch.float64)
    if mean is not None:
        std_ = torch.tensor(std, dtype=torch.float64)
        out.div_((divisor * std_).to(out).view(1, -1, 1, 1))
        return out.add_((-torch.tensor(mean, dtype=torch.float64) / std_).to(out).view(1, -1, 1, 1))
    if images.dtype == torch.uint8:
        out.div_(float(UINT8_MAX))
    return out


# --- colour jitter (float32 NHWC in [0, 1]; one factor per image) -------------------------------------------------

def _grayscale(images: np.ndarray) -> np.ndarray:
    return images @ GRAY_WEIGHTS  # (N, H, W)


def _blend(images: np.ndarray, other: np.ndarray, factors: np.ndarray) -> np.ndarray:
    f = factors.reshape(-1, 1, 1, 1).astype(np.float32)
    return np.clip(f * images + (1 - f) * other, 0.0, 1.0)


def adjust_brightness(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Scale intensities by ``factors`` (N,): torchvision's ``adjust_brightness``."""
    return _blend(images, np.zeros_like(images), factors)


def adjust_contrast(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Blend each image with its mean gray level: torchvision's ``adjust_contrast``."""
    mean = _grayscale(images).mean(axis=(1, 2))[:, None, None, None]
    return _blend(images, mean, factors)


def adjust_saturation(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Blend each image with its grayscale version: torchvision's ``adjust_saturation``."""
    return _blend(images, _grayscale(images)[..., None], factors)


def rgb_to_hsv(images: np.ndarray) -> np.ndarray:
    """RGB -> HSV, all in [0, 1] (hue as a fraction of the circle), as torchvision's ``_rgb2hsv``."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    maxc, minc = images.max(axis=-1), images.min(axis=-1)
    delta = maxc - minc
    gray = delta == 0
    sat = delta / np.where(gray, 1.0, maxc)
    cr = np.where(gray, 1.0, delta)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    hue = np.where(maxc == r, bc - gc, 0.0)
    hue = hue + np.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hue = hue + np.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    hue = np.mod(hue / 6.0 + 1.0, 1.0)
    return np.stack([hue, sat, maxc], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV -> RGB, all in [0, 1], as torchvision's ``_hsv2rgb``."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6.0)
    frac = h * 6.0 - sector
    sector = sector.astype(np.int64) % 6
    p = np.clip(v * (1.0 - s), 0.0, 1.0)
    q = np.clip(v * (1.0 - s * frac), 0.0, 1.0)
    t = np.clip(v * (1.0 - s * (1.0 - frac)), 0.0, 1.0)
    table = np.stack([  # (6 sectors, 3 channels, ...)
        np.stack([v, q, p, p, t, v]), np.stack([t, v, v, q, p, p]), np.stack([p, p, t, v, v, q]),
    ], axis=1)
    rgb = np.take_along_axis(table, sector[None, None], axis=0)[0]  # (3, ...)
    return np.moveaxis(rgb, 0, -1).astype(np.float32)


def adjust_hue(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Rotate each image's hue by ``shifts`` (N,) in [-0.5, 0.5] of the circle: torchvision's ``adjust_hue``."""
    hsv = rgb_to_hsv(images)
    hsv[..., 0] = np.mod(hsv[..., 0] + shifts.reshape(-1, 1, 1).astype(np.float32), 1.0)
    return hsv_to_rgb(hsv)


def color_jitter(images: np.ndarray, rng: np.random.Generator, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, hue: float = 0.0) -> np.ndarray:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` over float32 (N, H, W, 3) in [0, 1].

    Each image draws its own factors (brightness from [max(0, 1 - b), 1 + b], likewise contrast and saturation;
    hue shift from [-hue, hue]). torchvision shuffles the order of the four adjustments per image; here one random
    order applies to the whole batch, so the work stays vectorised. Zero strengths are skipped.
    """
    n = len(images)
    steps = []
    for strength, adjust in ((brightness, adjust_brightness), (contrast, adjust_contrast),
                             (saturation, adjust_saturation)):
        if strength > 0:
            steps.append((adjust, rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, n)))
    if hue > 0:
        if hue > 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
        steps.append((adjust_hue, rng.uniform(-hue, hue, n)))
    for i in rng.permutation(len(steps)):
        adjust, factors = steps[i]
        images = adjust(images, factors)
    return images


# --- geometry (per image, PIL bilinear like torchvision) ----------------------------------------------------------

def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = DEFAULT_SCALE, ratio: Sequence[float] = DEFAULT_RATIO) -> Box:
    """torchvision's ``RandomResizedCrop.get_params``: a crop of random area share and aspect, else a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, box: Box, size: int | Sequence[int]) -> np.ndarray:
    """Crop ``box`` (top, left, height, width) out of uint8 (H, W, 3) and resize it bilinearly to ``size``."""
    top, left, h, w = box
    out_h, out_w = _size_hw(size)
    crop = Image.fromarray(np.ascontiguousarray(image)).crop((left, top, left + w, top + h))
    return np.asarray(crop.resize((out_w, out_h), Image.BILINEAR))


def random_resized_crop(images: Sequence[np.ndarray], size: int | Sequence[int], rng: np.random.Generator,
                        scale: Sequence[float] = DEFAULT_SCALE,
                        ratio: Sequence[float] = DEFAULT_RATIO) -> np.ndarray:
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` for each image of any size -> uint8 (N, h, w, 3)."""
    return np.stack([resized_crop(img, random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, ratio), size)
                     for img in images])


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``Resize(size)``: shorter side to ``size``, aspect kept (longer side truncated to an int)."""
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR))


def _center_origin(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, out_h, out_w) of torchvision's ``CenterCrop(size)`` in an image at least ``size`` large."""
    out_h, out_w = _size_hw(size)
    if height < out_h or width < out_w:
        raise ValueError(f"image of {height}x{width} is smaller than the centre crop {out_h}x{out_w}")
    return round((height - out_h) / 2.0), round((width - out_w) / 2.0), out_h, out_w


def center_crop(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """torchvision's ``CenterCrop(size)`` of uint8 (H, W, 3), for an image at least ``size`` large."""
    top, left, out_h, out_w = _center_origin(image.shape[0], image.shape[1], size)
    return image[top : top + out_h, left : left + out_w]


def resize_center_crop(images: Sequence[np.ndarray], resize_size: int, size: int | Sequence[int]) -> np.ndarray:
    """torchvision's ``Resize(resize_size)`` then ``CenterCrop(size)`` for each image -> uint8 (N, h, w, 3).

    A batch already stacked at that scale (an (N, H, W, 3) array with shorter side ``resize_size``, e.g. CIFAR at
    its own size) is cropped in one slice.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4 and min(images.shape[1:3]) == resize_size:
        top, left, out_h, out_w = _center_origin(images.shape[1], images.shape[2], size)
        return np.ascontiguousarray(images[:, top : top + out_h, left : left + out_w])
    return np.stack([center_crop(resize_shorter(img, resize_size), size) for img in images])


# --- policies -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentPolicy:
    """Which random steps a training batch gets; without ``crop`` it is resized and centre-cropped instead."""

    crop: bool = False  # RandomResizedCrop
    flip: bool = False  # random horizontal flip
    color: bool = False  # ColorJitter


#: Augmentation policies by name, for ``augment.policy`` (a sweep can search over the names).
POLICIES: dict[str, AugmentPolicy] = {
    "none": AugmentPolicy(),
    "flip": AugmentPolicy(flip=True),
    "color": AugmentPolicy(color=True),
    "crop": AugmentPolicy(crop=True),
    "flip_color": AugmentPolicy(flip=True, color=True),
    "flip_crop": AugmentPolicy(crop=True, flip=True),
    "flip_crop_color": AugmentPolicy(crop=True, flip=True, color=True),
}
#: What evaluation batches get: no random step.
EVAL_POLICY = POLICIES["none"]


def get_policy(name: str) -> AugmentPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f'Unknown data augmentation policy "{name}"; valid: {", ".join(POLICIES)}') from None
