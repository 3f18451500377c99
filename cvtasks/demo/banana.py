"""A small, learnable stand-in for d2l's banana-detection dataset, written in the real layout.

Each 256x256 PNG shows one to ``max_per_image`` fruits (by default only bananas, the real dataset's one class)
at random positions, sizes and angles, composited onto a varied background: a two-colour gradient, blurred
colour blobs, and unlabelled distractor shapes (boxes, discs, triangles in non-fruit colours).
Fruits do not overlap each other much (IoU <= ``MAX_OVERLAP_IOU``); distractors may be covered. Each fruit's box
is the tight box of its visible pixels. Output is a function of the arguments alone.

Fruits: ``banana`` (a curved yellow band with brown tips), ``apple`` (a red disc with a stem and leaf) and
``orange`` (an orange dimpled disc); ``classes`` picks which appear and numbers them in that order.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cvtasks.formats import banana as fmt
from cvtasks.images import encode_png

log = logging.getLogger(__name__)

IMAGE_SIZE = 256
SUPERSAMPLE = 2  # fruits are drawn this many times larger, then downsampled (anti-aliasing)
OBJECT_LENGTH = (0.2, 0.5)  # a fruit's drawn length as a share of the image side
MAX_OVERLAP_IOU = 0.1
PLACEMENT_TRIES = 20
DISTRACTORS = (0, 2)  # unlabelled shapes per image, range
BLOBS = (3, 8)  # blurred background blobs per image, range
BLOB_BLUR = 6.0
COLOUR_JITTER = 20  # +- uint8 levels around a fruit's base colours
ALPHA_VISIBLE = 64  # a sprite pixel counts as part of the fruit's box above this alpha

Colour = tuple[int, int, int]
Draw = ImageDraw.ImageDraw
DISTRACTOR_COLOURS: tuple[Colour, ...] = ((40, 70, 190), (120, 60, 160), (130, 130, 140), (20, 140, 140),
                                          (110, 60, 40), (230, 230, 230))


def _jitter(rng: np.random.Generator, colour: Colour) -> Colour:
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in colour)


# --- fruits: each draws itself centred on a square RGBA canvas of side ``side``, about side / 1.5 long --------------

def banana(draw: Draw, side: int, rng: np.random.Generator) -> None:
    radius = side / 3
    c = side / 2
    bend = rng.uniform(0.45, 0.8)  # vertical squash of the arc's ellipse: how curved the banana is
    ellipse = (c - radius, c - radius * bend, c + radius, c + radius * bend)
    start, end = rng.uniform(190, 205), rng.uniform(335, 350)
    thickness = int(radius * rng.uniform(0.26, 0.36))
    draw.arc(ellipse, start, end, fill=_jitter(rng, (236, 206, 58)), width=thickness)
    draw.arc(ellipse, start, end, fill=_jitter(rng, (200, 160, 30)), width=max(1, thickness // 5))
    tip = _jitter(rng, (110, 80, 30))
    draw.arc(ellipse, start, start + 8, fill=tip, width=thickness)
    draw.arc(ellipse, end - 6, end, fill=tip, width=thickness)


def apple(draw: Draw, side: int, rng: np.random.Generator) -> None:
    c, r = side / 2, side / 3.2
    draw.ellipse((c - r, c - r * 0.9, c + r, c + r), fill=_jitter(rng, (200, 30, 40)))
    draw.ellipse((c - r * 0.55, c - r * 0.6, c - r * 0.2, c - r * 0.25), fill=_jitter(rng, (240, 120, 120)))
    draw.line((c, c - r * 0.8, c + r * 0.1, c - r * 1.2), fill=(90, 60, 20), width=max(1, int(r * 0.1)))
    draw.ellipse((c + r * 0.1, c - r * 1.15, c + r * 0.55, c - r * 0.9), fill=_jitter(rng, (60, 150, 40)))


def orange(draw: Draw, side: int, rng: np.random.Generator) -> None:
    c, r = side / 2, side / 3.2
    draw.ellipse((c - r, c - r, c + r, c + r), fill=_jitter(rng, (245, 140, 20)))
    dimple = _jitter(rng, (215, 110, 10))
    for _ in range(int(rng.integers(10, 20))):
        angle, dist = rng.uniform(0, 2 * np.pi), r * np.sqrt(rng.uniform(0, 0.8))
        x, y, d = c + dist * np.cos(angle), c + dist * np.sin(angle), r * 0.05
        draw.ellipse((x - d, y - d, x + d, y + d), fill=dimple)


FRUITS: dict[str, Callable[[Draw, int, np.random.Generator], None]] = {
    "banana": banana, "apple": apple, "orange": orange,
}


def sprite(name: str, length: float, rng: np.random.Generator) -> Image.Image:
    """Fruit ``name`` about ``length`` pixels long at a random angle: an RGBA image cropped to its visible box."""
    side = max(8, int(length * 1.5 * SUPERSAMPLE))
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    FRUITS[name](ImageDraw.Draw(layer), side, rng)
    layer = layer.rotate(rng.uniform(0, 360), resample=Image.BILINEAR)
    layer = layer.resize((side // SUPERSAMPLE, side // SUPERSAMPLE), Image.LANCZOS)
    visible = layer.getchannel("A").point(lambda a: 255 if a > ALPHA_VISIBLE else 0).getbbox()
    return layer.crop(visible)


# --- scenes -----------------------------------------------------------------------------------------------------------

def background(rng: np.random.Generator) -> Image.Image:
    """A gradient between two random colours in a random direction, with blurred colour blobs."""
    top, bottom = (rng.integers(20, 235, 3).astype(np.float64) for _ in range(2))
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle), 0, 1)[..., None]
    image = Image.fromarray(np.rint(top + (bottom - top) * ramp).astype(np.uint8))
    blobs = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(BLOBS[0], BLOBS[1] + 1))):
        x, y = rng.uniform(0, IMAGE_SIZE, 2)
        rx, ry = rng.uniform(10, 60, 2)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=(*(int(v) for v in rng.integers(0, 256, 3)), 140))
    blurred = blobs.filter(ImageFilter.GaussianBlur(BLOB_BLUR))
    image.paste(blurred, (0, 0), blurred)
    return image


def distractor(draw: Draw, rng: np.random.Generator) -> None:
    """An unlabelled box, disc or triangle about as large as a fruit."""
    size = rng.uniform(*OBJECT_LENGTH) * IMAGE_SIZE / 2
    x, y = rng.uniform(0, IMAGE_SIZE, 2)
    colour = _jitter(rng, DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))])
    kind = int(rng.integers(3))
    if kind == 0:
        draw.rectangle((x - size, y - size * 0.6, x + size, y + size * 0.6), fill=colour)
    elif kind == 1:
        draw.ellipse((x - size, y - size, x + size, y + size), fill=colour)
    else:
        draw.polygon([(x, y - size), (x - size, y + size), (x + size, y + size)], fill=colour)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def scene(classes: Sequence[str], max_per_image: int,
          rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """One image (uint8 (256, 256, 3)) and its objects (class id, xmin, ymin, xmax, ymax), at least one."""
    image = background(rng)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))):
        distractor(draw, rng)
    objects: list[tuple[int, int, int, int, int]] = []
    for _ in range(int(rng.integers(1, max_per_image + 1))):
        label = int(rng.integers(len(classes)))
        fruit = sprite(classes[label], rng.uniform(*OBJECT_LENGTH) * IMAGE_SIZE, rng)
        for _ in range(PLACEMENT_TRIES):
            x = int(rng.integers(0, IMAGE_SIZE - fruit.width + 1))
            y = int(rng.integers(0, IMAGE_SIZE - fruit.height + 1))
            box = (x, y, x + fruit.width, y + fruit.height)
            if all(_iou(box, other[1:]) <= MAX_OVERLAP_IOU for other in objects):
                image.paste(fruit, box[:2], fruit)
                objects.append((label, *box))
                break
    return np.asarray(image), objects


def write(root: str | Path, seed: int = 0, n_train: int = 600, n_val: int = 100,
          classes: Sequence[str] = ("banana",), max_per_image: int = 3) -> Path:
    """Write ``<root>/banana-detection/bananas_{train,val}/{images/N.png,label.csv}``; returns the dataset folder."""
    unknown = sorted(set(classes) - set(FRUITS))
    if unknown or not classes:
        raise ValueError(f"demo classes must be some of {', '.join(FRUITS)}, got {list(classes)}")
    folder = Path(root) / fmt.DATASET_DIR
    for split, count in (("train", n_train), ("val", n_val)):
        split_dir = folder / fmt.SPLIT_DIRS[split]
        images_dir = split_dir / fmt.IMAGES_DIR
        images_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
        lines = [",".join(fmt.COLUMNS)]
        for i in range(count):
            image, objects = scene(classes, max_per_image, rng)
            (images_dir / f"{i}.png").write_bytes(encode_png(image))
            lines += [f"{i}.png,{label},{x1},{y1},{x2},{y2}" for label, x1, y1, x2, y2 in objects]
        (split_dir / fmt.LABEL_FILE).write_text("\n".join(lines) + "\n")
    log.info("wrote demo banana-detection (%d train, %d val images, classes %s) to %s", n_train, n_val,
             ", ".join(classes), folder)
    return folder
