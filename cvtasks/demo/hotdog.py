"""Small stand-ins for d2l's hotdog dataset and for a larger related "source" dataset to pretrain on.

``write``: ``hotdog/{train,test}/{hotdog,not-hotdog}/*.png``. A hot dog is a sausage lying in a bun (often with a
mustard zigzag); not-hotdog images show one of ten other foods, among them a bun alone, a sausage alone and a
baguette, so the class hinges on the combination. The training split is small on purpose: trained from scratch
for a few epochs a ResNet-18 struggles, which is what fine-tuning is for.

``write_source``: ``hotdog-source/{train,test}/<10 foods>/*.png``, a larger dataset of the ten other foods, drawn
with the same primitives on the same backgrounds but without hot dogs: pretrain a ResNet-18 on it, then fine-tune
on ``hotdog`` (the demo's stand-in for ImageNet pretraining).

Images are RGB PNGs of varying size (``SIZE_RANGE``): a table-coloured gradient, sometimes a plate, crumbs, one
food at a random angle, scale and position, drawn at ``SUPERSAMPLE`` x resolution and downsampled (anti-aliasing),
plus pixel noise. Deterministic given the seed.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cvtasks.formats.imagefolder import SPLIT_DIRS
from cvtasks.images import encode_png

log = logging.getLogger(__name__)

DATASET_DIR = "hotdog"
SOURCE_DIR = "hotdog-source"
HOTDOG, NOT_HOTDOG = "hotdog", "not-hotdog"

SIZE_RANGE = (64, 96)  # image width and height, pixels, drawn independently
SUPERSAMPLE = 2
OBJECT_LENGTH = (0.55, 0.85)  # the food's length as a share of the image's shorter side
PIXEL_NOISE = 6.0  # std of per-pixel noise, uint8 levels
COLOUR_JITTER = 22  # +- uint8 levels around a food's base colours
PLATE_PROBABILITY = 0.5
CRUMBS = (0, 6)  # crumbs per image, range
MUSTARD_PROBABILITY = 0.6

Colour = tuple[int, int, int]
Draw = ImageDraw.ImageDraw


def _jitter(rng: np.random.Generator, colour: Colour) -> Colour:
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in colour)


def _box(cx: float, cy: float, half_w: float, half_h: float) -> tuple[float, float, float, float]:
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def _darker(colour: Colour, factor: float = 0.7) -> Colour:
    return tuple(int(c * factor) for c in colour)


# --- foods: each draws itself centred at (cx, cy), lying horizontally, ``length`` pixels long ----------------------

def bun(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    colour = _jitter(rng, (214, 164, 96))
    draw.ellipse(_box(cx, cy, length / 2, 0.17 * length), fill=colour, outline=_darker(colour), width=2)
    draw.line([(cx - 0.36 * length, cy), (cx + 0.36 * length, cy)], fill=_darker(colour, 0.8), width=2)


def sausage(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    colour = _jitter(rng, (168, 62, 44))
    half_h = 0.07 * length
    draw.rounded_rectangle(_box(cx, cy, length / 2, half_h), radius=half_h, fill=colour, outline=_darker(colour))
    draw.line([(cx - 0.4 * length, cy - 0.4 * half_h), (cx + 0.4 * length, cy - 0.4 * half_h)],
              fill=tuple(min(255, c + 50) for c in colour), width=2)


def hotdog(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    bun(draw, cx, cy, length, rng)
    sausage(draw, cx, cy - 0.02 * length, 1.12 * length, rng)
    if rng.random() < MUSTARD_PROBABILITY:
        teeth = int(rng.integers(5, 9))
        xs = np.linspace(cx - 0.38 * length, cx + 0.38 * length, 2 * teeth + 1)
        points = [(float(x), cy - 0.02 * length + (0.04 if i % 2 else -0.04) * length) for i, x in enumerate(xs)]
        draw.line(points, fill=_jitter(rng, (236, 200, 40)), width=3)


def baguette(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    colour = _jitter(rng, (200, 140, 70))
    half_h = 0.11 * length
    draw.rounded_rectangle(_box(cx, cy, length / 2, half_h), radius=half_h, fill=colour, outline=_darker(colour))
    for x in np.linspace(cx - 0.3 * length, cx + 0.3 * length, 4):
        draw.line([(x - 0.05 * length, cy + 0.6 * half_h), (x + 0.05 * length, cy - 0.6 * half_h)],
                  fill=_jitter(rng, (240, 215, 160)), width=3)


def donut(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    radius = 0.36 * length
    dough = _jitter(rng, (196, 136, 72))
    glaze = _jitter(rng, [(240, 150, 190), (110, 60, 40), (245, 240, 230)][int(rng.integers(3))])
    draw.ellipse(_box(cx, cy, radius, radius), fill=dough)
    draw.ellipse(_box(cx, cy, 0.85 * radius, 0.85 * radius), fill=glaze)
    for _ in range(int(rng.integers(6, 14))):
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.45, 0.75) * radius
        x, y = cx + dist * math.cos(angle), cy + dist * math.sin(angle)
        tilt = rng.uniform(0, math.pi)
        dx, dy = 0.06 * radius * math.cos(tilt), 0.06 * radius * math.sin(tilt)
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=2)
    draw.ellipse(_box(cx, cy, 0.3 * radius, 0.3 * radius), fill=(0, 0, 0, 0))  # the hole shows the background


def pizza(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    half = length / 2
    cheese, crust = _jitter(rng, (246, 196, 70)), _jitter(rng, (205, 140, 70))
    draw.polygon([(cx - half, cy - 0.35 * length), (cx - half, cy + 0.35 * length), (cx + half, cy)], fill=cheese)
    draw.line([(cx - half, cy - 0.35 * length), (cx - half, cy + 0.35 * length)], fill=crust, width=int(0.12 * length))
    for _ in range(int(rng.integers(3, 6))):
        t = rng.uniform(0.15, 0.6)
        x, y = cx - half + t * length, cy + rng.uniform(-0.6, 0.6) * 0.35 * length * (1 - t)
        r = 0.06 * length
        draw.ellipse(_box(x, y, r, r), fill=_jitter(rng, (180, 40, 40)))


def burger(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    half = 0.4 * length
    bread = _jitter(rng, (214, 164, 96))
    draw.rounded_rectangle(_box(cx, cy + 0.22 * length, half, 0.07 * length), radius=0.05 * length, fill=bread)
    draw.rounded_rectangle(_box(cx, cy + 0.1 * length, 1.05 * half, 0.07 * length), radius=0.05 * length,
                           fill=_jitter(rng, (90, 50, 30)))
    waves = np.linspace(cx - 1.1 * half, cx + 1.1 * half, 9)
    lettuce = [(float(x), cy + (0.01 if i % 2 else -0.03) * length) for i, x in enumerate(waves)]
    draw.polygon(lettuce + [(cx + 1.1 * half, cy + 0.04 * length), (cx - 1.1 * half, cy + 0.04 * length)],
                 fill=_jitter(rng, (80, 170, 60)))
    draw.chord(_box(cx, cy - 0.02 * length, half, 0.26 * length), 180, 360, fill=bread, outline=_darker(bread))
    for _ in range(int(rng.integers(4, 9))):
        x, y = cx + rng.uniform(-0.7, 0.7) * half, cy - rng.uniform(0.08, 0.2) * length
        draw.ellipse(_box(x, y, 0.02 * length, 0.012 * length), fill=(245, 240, 220))


def apple(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    radius = 0.3 * length
    skin = _jitter(rng, [(200, 30, 40), (120, 190, 60)][int(rng.integers(2))])
    draw.ellipse(_box(cx, cy + 0.05 * length, radius, 0.92 * radius), fill=skin, outline=_darker(skin))
    draw.line([(cx, cy - 0.8 * radius), (cx + 0.1 * length, cy - 1.3 * radius)], fill=(100, 60, 30), width=3)
    draw.ellipse(_box(cx + 0.14 * length, cy - 1.1 * radius, 0.08 * length, 0.04 * length), fill=(60, 150, 50))


def carrot(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    half = length / 2
    colour = _jitter(rng, (240, 120, 30))
    draw.polygon([(cx - 0.35 * half, cy - 0.1 * length), (cx - 0.35 * half, cy + 0.1 * length), (cx + half, cy)],
                 fill=colour)
    for x in np.linspace(cx - 0.2 * half, cx + 0.6 * half, 4):
        h = 0.1 * length * (cx + half - x) / (1.35 * half)
        draw.line([(x, cy - 0.6 * h), (x, cy - 0.1 * h)], fill=_darker(colour), width=2)
    for spread in (-0.08, 0.0, 0.08):
        draw.line([(cx - 0.35 * half, cy), (cx - half, cy + spread * length * 2)], fill=(60, 150, 50), width=4)


def cookie(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    radius = 0.32 * length
    dough = _jitter(rng, (214, 170, 110))
    draw.ellipse(_box(cx, cy, radius, radius), fill=dough, outline=_darker(dough))
    for _ in range(int(rng.integers(5, 10))):
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.75) * radius
        r = 0.05 * length
        draw.ellipse(_box(cx + dist * math.cos(angle), cy + dist * math.sin(angle), r, r), fill=(70, 40, 25))


def egg(draw: Draw, cx: float, cy: float, length: float, rng: np.random.Generator) -> None:
    white = _jitter(rng, (245, 245, 240))
    for _ in range(4):
        x, y = cx + rng.uniform(-0.12, 0.12) * length, cy + rng.uniform(-0.08, 0.08) * length
        draw.ellipse(_box(x, y, rng.uniform(0.2, 0.3) * length, rng.uniform(0.15, 0.24) * length), fill=white)
    draw.ellipse(_box(cx, cy, 0.1 * length, 0.1 * length), fill=_jitter(rng, (250, 180, 20)))


FoodDrawer = Callable[[Draw, float, float, float, np.random.Generator], None]
#: The source dataset's classes, and what not-hotdog images show.
OTHER_FOODS: dict[str, FoodDrawer] = {
    "apple": apple, "baguette": baguette, "bun": bun, "burger": burger, "carrot": carrot,
    "cookie": cookie, "donut": donut, "egg": egg, "pizza": pizza, "sausage": sausage,
}  # fmt: skip


# --- scenes -----------------------------------------------------------------------------------------------------------

def background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A vertical gradient between two table colours, sometimes a plate, and crumbs."""
    top, bottom = (np.array(_jitter(rng, tuple(int(v) for v in rng.integers(60, 200, 3)))) for _ in range(2))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = np.broadcast_to(top + (bottom - top) * ramp, (height, width, 3))
    image = Image.fromarray(np.rint(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if rng.random() < PLATE_PROBABILITY:
        plate = _jitter(rng, (232, 232, 226))
        rx, ry = rng.uniform(0.35, 0.48) * width, rng.uniform(0.35, 0.48) * height
        draw.ellipse(_box(width / 2, height / 2, rx, ry), fill=plate, outline=_darker(plate, 0.85), width=3)
    for _ in range(int(rng.integers(CRUMBS[0], CRUMBS[1] + 1))):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(1, 3) * SUPERSAMPLE
        draw.ellipse(_box(x, y, r, r), fill=_jitter(rng, (170, 120, 70)))
    return image


def draw_scene(food: FoodDrawer, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) of one ``food`` on a random background."""
    width, height = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, 2))
    big_w, big_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    scene = background(big_w, big_h, rng)
    side = 2 * max(big_w, big_h)
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    length = rng.uniform(*OBJECT_LENGTH) * min(big_w, big_h)
    food(ImageDraw.Draw(layer), side / 2, side / 2, length, rng)
    layer = layer.rotate(rng.uniform(0, 360), resample=Image.BILINEAR)
    # Centre the food within the middle of the image, leaving room for its half-length on either side.
    margin_x, margin_y = max(0.0, big_w / 2 - length / 2), max(0.0, big_h / 2 - length / 2)
    cx = big_w / 2 + rng.uniform(-margin_x, margin_x) * 0.6
    cy = big_h / 2 + rng.uniform(-margin_y, margin_y) * 0.6
    scene.paste(layer, (round(cx - side / 2), round(cy - side / 2)), layer)
    small = np.asarray(scene.resize((width, height), Image.LANCZOS), dtype=np.float64)
    noisy = small + rng.normal(0, PIXEL_NOISE, small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _write_class(folder: Path, foods: list[FoodDrawer], count: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        food = foods[int(rng.integers(len(foods)))]
        (folder / f"{i:04d}.png").write_bytes(encode_png(draw_scene(food, rng)))


def _class_rng(seed: int, dataset: str, split: str, label: str) -> np.random.Generator:
    """A generator per (seed, dataset, split, class), so each folder's content is independent of the others."""
    return np.random.default_rng([seed] + [zlib.crc32(name.encode()) for name in (dataset, split, label)])


def write(root: str | Path, seed: int = 0, n_train_per_class: int = 80, n_test_per_class: int = 100) -> Path:
    """Write ``<root>/hotdog/{train,test}/{hotdog,not-hotdog}/NNNN.png``; returns the dataset folder."""
    folder = Path(root) / DATASET_DIR
    classes = {HOTDOG: [hotdog], NOT_HOTDOG: list(OTHER_FOODS.values())}
    for split, count in (("train", n_train_per_class), ("val", n_test_per_class)):
        for label, foods in classes.items():
            split_dir = SPLIT_DIRS[split]
            _write_class(folder / split_dir / label, foods, count, _class_rng(seed, DATASET_DIR, split_dir, label))
    log.info("wrote demo hotdog (%d train, %d test images per class) to %s", n_train_per_class, n_test_per_class,
             folder)
    return folder


def write_source(root: str | Path, seed: int = 0, n_train_per_class: int = 120, n_test_per_class: int = 30) -> Path:
    """Write ``<root>/hotdog-source/{train,test}/<food>/NNNN.png`` for the ten ``OTHER_FOODS``; returns the folder."""
    folder = Path(root) / SOURCE_DIR
    for split, count in (("train", n_train_per_class), ("val", n_test_per_class)):
        for label, food in OTHER_FOODS.items():
            split_dir = SPLIT_DIRS[split]
            _write_class(folder / split_dir / label, [food], count, _class_rng(seed, SOURCE_DIR, split_dir, label))
    log.info("wrote demo hotdog-source (%d classes, %d train, %d test images per class) to %s", len(OTHER_FOODS),
             n_train_per_class, n_test_per_class, folder)
    return folder
