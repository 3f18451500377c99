"""A small, learnable stand-in for Pascal VOC2012 segmentation, written in the real layout.

Each scene is a textured background with one to three objects of five VOC classes, each class with its own shape,
colour family and texture (aeroplane: grey striped triangle, bottle: green checked bar, car: red plain box, cat:
orange striped ellipse, person: pink dotted capsule). Objects may overlap. Images are JPEGs of varying size; masks
are VOC palette PNGs with a ``IGNORE_INDEX`` band a few pixels wide along every class boundary, as in VOC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cvtasks.formats import voc

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
#: Width in pixels of the window that marks a pixel as boundary when it sees two classes: a band of ~4 px.
BOUNDARY_WINDOW = 5
MAX_OBJECTS = 3
#: Object size as a share of the image's shorter side.
OBJECT_SCALE = (0.3, 0.65)
BACKGROUND_NOISE = 8.0  # std of per-pixel noise, in uint8 levels
OBJECT_NOISE = 6.0
COLOUR_JITTER = 25  # +- uint8 levels around a class's base colour


@dataclass(frozen=True)
class Look:
    """How one class is drawn."""

    shape: str  # triangle | bar | box | ellipse | capsule
    colour: tuple[int, int, int]
    texture: str  # stripes | checks | plain | dots
    aspect: float  # height / width of the object's box


LOOKS: dict[str, Look] = {
    "aeroplane": Look("triangle", (170, 170, 180), "stripes", 0.6),
    "bottle": Look("bar", (40, 150, 60), "checks", 2.5),
    "car": Look("box", (200, 30, 30), "plain", 0.55),
    "cat": Look("ellipse", (230, 140, 40), "stripes", 0.8),
    "person": Look("capsule", (240, 170, 170), "dots", 2.0),
}
TEXTURE_PERIOD = (6, 12)  # pixels between stripes / dots / checks


def write(root: str | Path, seed: int = 0, n_train: int = 160, n_val: int = 40, min_side: int = 128,
          max_side: int = 200) -> Path:
    """Write ``root/VOCdevkit/VOC2012`` with ``n_train`` + ``n_val`` scenes; returns ``root/VOCdevkit``.

    Image heights and widths are drawn independently from [``min_side``, ``max_side``]; output is a function of
    ``seed`` and the sizes alone.
    """
    devkit = Path(root) / voc.DEVKIT_DIR
    base = devkit / voc.YEAR_DIR
    images_dir, masks_dir = base / voc.IMAGES_DIR, base / voc.MASKS_DIR
    splits_dir = base.joinpath(*voc.SPLITS_DIR)
    for folder in (images_dir, masks_dir, splits_dir):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = {"train": [f"demo_{i:06d}" for i in range(n_train)],
             "val": [f"demo_{i:06d}" for i in range(n_train, n_train + n_val)]}
    for split in ("train", "val"):
        for name in names[split]:
            size = (int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1)))
            image, mask = scene(size, rng)
            Image.fromarray(image).save(images_dir / f"{name}{voc.IMAGE_SUFFIX}", quality=JPEG_QUALITY)
            voc.write_mask(masks_dir / f"{name}{voc.MASK_SUFFIX}", mask)
        (splits_dir / f"{split}.txt").write_text("".join(f"{n}\n" for n in names[split]))
    (splits_dir / "trainval.txt").write_text("".join(f"{n}\n" for n in names["train"] + names["val"]))
    log.info("VOC demo: %d train + %d val scenes under %s", n_train, n_val, devkit)
    return devkit


def scene(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (height, width) scene: uint8 image (H, W, 3) and class mask (H, W) with boundary bands."""
    image = _background(size, rng)
    labels = np.zeros(size, dtype=np.uint8)
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        name = list(LOOKS)[int(rng.integers(len(LOOKS)))]
        look = LOOKS[name]
        region = _shape_mask(look, size, rng)
        image[region] = _texture(look, size, rng)[region]
        labels[region] = voc.VOC_CLASSES.index(name)
    noise = rng.normal(0.0, OBJECT_NOISE, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, _with_boundaries(labels)


def _background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A linear gradient between two random colours in a random direction, plus noise; float (H, W, 3)."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = x * np.cos(angle) + y * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = start + ramp[..., None] * (end - start)
    return image + rng.normal(0.0, BACKGROUND_NOISE, image.shape)


def _shape_mask(look: Look, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Boolean (H, W) region of one object placed at random, at least partly inside the image."""
    height, width = size
    extent = rng.uniform(*OBJECT_SCALE) * min(size)
    obj_h = extent * np.sqrt(look.aspect)
    obj_w = extent / np.sqrt(look.aspect)
    top = rng.uniform(-0.2 * obj_h, height - 0.8 * obj_h)
    left = rng.uniform(-0.2 * obj_w, width - 0.8 * obj_w)
    box = (left, top, left + obj_w, top + obj_h)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if look.shape == "triangle":
        draw.polygon([(left, top + obj_h), (left + obj_w / 2, top), (left + obj_w, top + obj_h)], fill=1)
    elif look.shape in ("bar", "box"):
        draw.rectangle(box, fill=1)
    elif look.shape == "ellipse":
        draw.ellipse(box, fill=1)
    elif look.shape == "capsule":
        draw.rounded_rectangle(box, radius=obj_w / 2, fill=1)
    else:
        raise ValueError(f'Unknown demo shape "{look.shape}"')
    return np.asarray(canvas, dtype=bool)


def _texture(look: Look, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Full-frame float (H, W, 3) fill in the class's colour family and texture."""
    height, width = size
    colour = np.clip(np.asarray(look.colour) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    dark = colour * 0.45
    period = int(rng.integers(*TEXTURE_PERIOD))
    y, x = np.mgrid[0:height, 0:width]
    if look.texture == "plain":
        pattern = np.zeros(size, dtype=bool)
    elif look.texture == "stripes":
        angle = rng.uniform(0, np.pi)
        pattern = ((x * np.cos(angle) + y * np.sin(angle)) // (period / 2)) % 2 == 1
    elif look.texture == "checks":
        pattern = ((x // period) + (y // period)) % 2 == 1
    elif look.texture == "dots":
        pattern = ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) < (period / 4) ** 2
    else:
        raise ValueError(f'Unknown demo texture "{look.texture}"')
    return np.where(pattern[..., None], dark, colour).astype(np.float64)


def _with_boundaries(labels: np.ndarray) -> np.ndarray:
    """Set ``IGNORE_INDEX`` wherever a ``BOUNDARY_WINDOW``-wide window sees more than one class."""
    img = Image.fromarray(labels)
    high = np.asarray(img.filter(ImageFilter.MaxFilter(BOUNDARY_WINDOW)))
    low = np.asarray(img.filter(ImageFilter.MinFilter(BOUNDARY_WINDOW)))
    return np.where(high != low, voc.IGNORE_INDEX, labels).astype(np.uint8)
