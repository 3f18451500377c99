"""A small, learnable stand-in for CIFAR-10, written in exactly the real ``cifar-10-batches-py`` layout.

Ten synthetic classes, each a shape or texture (disk, ring, square, frame, plus, bars, stripes, checker, triangle,
dots) at a random position and size. The object's hue leans towards its class (neighbouring classes overlap), and
the background is a random gradient with pixel noise and small clutter squares, so colour alone does not solve it.
Every class is symmetric under horizontal flips, so flip augmentation never changes a label.

The files are pickled as Python 2's cPickle wrote the real ones: protocol 2, ``str``/``bytes`` as BINSTRING
opcodes (they load as ``bytes`` with ``encoding="bytes"``), numpy arrays via ``numpy.core.multiarray._reconstruct``.
"""

from __future__ import annotations

import logging
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cvtasks.formats import cifar

log = logging.getLogger(__name__)

CLASS_NAMES = ("disk", "ring", "square", "frame", "plus", "bars", "stripes", "checker", "triangle", "dots")
NUM_CLASSES = len(CLASS_NAMES)
PICKLE_PROTOCOL = 2
SIZE = cifar.HEIGHT  # square images

CENTER_RANGE = (10.0, 22.0)  # object centre, pixels
RADIUS_RANGE = (5.0, 11.0)  # object half-size, pixels
HUE_SPREAD = 0.15  # std of the object's hue around its class hue (classes sit 0.1 apart on the hue circle)
SATURATION_RANGE = (0.45, 1.0)
VALUE_RANGE = (0.55, 1.0)
BACKGROUND_RANGE = (0.1, 0.7)  # per-channel background level at the gradient's ends
PIXEL_NOISE = 0.06  # std of per-pixel noise, in [0, 1] units
CLUTTER_SQUARES = 5  # small random-colour squares per image
CLUTTER_SIZE = (2, 4)  # their side, pixels


def _disk(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.hypot(dx, dy) - r


def _ring(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r


def _box(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(dx), np.abs(dy)) - r


def _square(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _box(dx, dy, 0.8 * r)


def _frame(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.abs(_box(dx, dy, 0.7 * r)) - 0.2 * r


def _plus(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    arm = 0.3 * r
    return np.minimum(np.maximum(np.abs(dx) - arm, np.abs(dy) - r), np.maximum(np.abs(dy) - arm, np.abs(dx) - r))


def _stripes_along(offset: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance to stripes of period 0.6 r, half of each period inked."""
    period = 0.6 * r
    return (np.abs(np.mod(offset / period, 1.0) - 0.5) - 0.25) * period


def _bars(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(_square(dx, dy, r), _stripes_along(dy, r))


def _stripes(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(_square(dx, dy, r), _stripes_along(dx, r))


def _checker(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    cell = 0.4 * r
    wave = np.sin(np.pi * dx / cell) * np.sin(np.pi * dy / cell)  # > 0 on the inked cells
    return np.maximum(_square(dx, dy, r), -2.0 * wave)


def _triangle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Upward triangle with apex (0, -r) and base corners (+-r, 0.8 r): the max of its three half-planes."""
    slope = 1.8  # the slanted sides drop 1.8 r over a half-width of r
    side = (slope * np.abs(dx) - (dy + r)) / np.hypot(slope, 1.0)
    return np.maximum(dy - 0.8 * r, side)


def _dots(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A 3 x 3 grid of dots spread over the object's box."""
    spacing = 0.75 * r
    qx = dx - spacing * np.clip(np.round(dx / spacing), -1, 1)
    qy = dy - spacing * np.clip(np.round(dy / spacing), -1, 1)
    return np.hypot(qx, qy) - 0.28 * r


#: Signed distance (pixels, negative inside) of each class's shape, over broadcast (N, H, W) offsets and (N, 1, 1)
#: half-sizes; in ``CLASS_NAMES`` order.
SHAPES: tuple[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], ...] = (
    _disk, _ring, _square, _frame, _plus, _bars, _stripes, _checker, _triangle, _dots,
)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] (any equal shapes) -> RGB in [0, 1] with a trailing axis of 3."""
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0, 6.0)
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def draw_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 images (N, 32, 32, 3) of the classes in ``labels``."""
    n = len(labels)
    coords = np.arange(SIZE, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    # Background: a linear gradient between two random colours in a random direction, plus clutter and noise.
    angle = rng.uniform(0, 2 * np.pi, n)
    ramp = (np.cos(angle)[:, None, None] * (xx - SIZE / 2) + np.sin(angle)[:, None, None] * (yy - SIZE / 2)) / SIZE
    ramp = np.clip(ramp + 0.5, 0, 1)[..., None]
    start, end = rng.uniform(*BACKGROUND_RANGE, (2, n, 1, 1, 3))
    images = start + (end - start) * ramp
    for _ in range(CLUTTER_SQUARES):
        side = rng.integers(CLUTTER_SIZE[0], CLUTTER_SIZE[1] + 1, n)[:, None, None]
        x0 = rng.integers(0, SIZE, n)[:, None, None]
        y0 = rng.integers(0, SIZE, n)[:, None, None]
        inside = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
        images = np.where(inside[..., None], rng.uniform(0, 1, (n, 1, 1, 3)), images)

    # Object: the class's shape, anti-aliased by its signed distance, in a colour near the class hue.
    cx, cy = rng.uniform(*CENTER_RANGE, (2, n, 1, 1))
    radius = rng.uniform(*RADIUS_RANGE, (n, 1, 1))
    dx, dy = xx - cx, yy - cy
    distance = np.empty((n, SIZE, SIZE))
    for k, shape in enumerate(SHAPES):
        members = labels == k
        distance[members] = shape(dx[members], dy[members], radius[members])
    coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
    hue = np.mod(labels / NUM_CLASSES + rng.normal(0, HUE_SPREAD, n), 1.0)
    colour = hsv_to_rgb(hue, rng.uniform(*SATURATION_RANGE, n), rng.uniform(*VALUE_RANGE, n))[:, None, None, :]
    images = images * (1 - coverage) + colour * coverage
    images = images + rng.normal(0, PIXEL_NOISE, images.shape)
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


class Py2Pickler(pickle._Pickler):
    """Pickles like Python 2's cPickle: ``str`` and ``bytes`` as py2 ``str`` (SHORT_BINSTRING / BINSTRING), and
    numpy's ``_reconstruct`` under its numpy 1.x module name, as in the real CIFAR-10 files.

    Python 3's own protocol-2 pickler writes ``bytes`` as calls to ``_codecs.encode``, which the real files never
    contain (and :class:`cvtasks.formats.cifar.SafeUnpickler` rightly refuses); hence the pure-Python pickler with
    these two opcodes overridden.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        if obj is cifar.ALLOWED_GLOBALS[("numpy._core.multiarray", "_reconstruct")]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dump_py2(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=PICKLE_PROTOCOL).dump(obj)


def batch_dict(images: np.ndarray, labels: np.ndarray, batch_label: str, first_id: int) -> dict[bytes, object]:
    """The real batch structure for uint8 NHWC ``images``: data rows are the R, G, B planes, each row-major."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), cifar.ROW_BYTES))
    names = [f"{CLASS_NAMES[label]}_s_{first_id + i:06d}.png".encode() for i, label in enumerate(labels)]
    return {b"batch_label": batch_label.encode(), b"labels": [int(v) for v in labels], b"data": data,
            b"filenames": names}


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % NUM_CLASSES)


def write(root: str | Path, seed: int = 0, n_train: int = 5000, n_test: int = 1000) -> Path:
    """Write ``<root>/cifar-10-batches-py`` with ``n_train`` images over the 5 training batches and ``n_test`` in
    ``test_batch``; returns the dataset folder. Deterministic given ``seed``."""
    folder = Path(root) / cifar.DATASET_DIR
    folder.mkdir(parents=True, exist_ok=True)
    num_batches = len(cifar.TRAIN_FILES)
    per_batch = np.diff(np.linspace(0, n_train, num_batches + 1).astype(int))
    rng = np.random.default_rng(seed)
    first_id = 0
    for i, (name, count) in enumerate(zip(cifar.TRAIN_FILES, per_batch, strict=True)):
        labels = _balanced_labels(int(count), rng)
        batch = batch_dict(draw_images(labels, rng), labels, f"training batch {i + 1} of {num_batches}", first_id)
        dump_py2(batch, folder / name)
        first_id += int(count)
    labels = _balanced_labels(n_test, rng)
    dump_py2(batch_dict(draw_images(labels, rng), labels, "testing batch 1 of 1", first_id), folder / cifar.TEST_FILE)
    meta = {b"num_cases_per_batch": int(per_batch[0]), b"label_names": [n.encode() for n in CLASS_NAMES],
            b"num_vis": cifar.ROW_BYTES}
    dump_py2(meta, folder / cifar.META_FILE)
    log.info("wrote demo CIFAR-10 (%d train, %d test images) to %s", n_train, n_test, folder)
    return folder
