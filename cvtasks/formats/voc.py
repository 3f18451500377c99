"""Pascal VOC2012 semantic segmentation: the on-disk layout, class masks, the VOC palette.

Layout under a dataset root (local path or URI)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png      class masks, palette ("P" mode) PNGs
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt   one image id per line

Class masks store the class index as the palette index of each pixel: 0 background, 1..20 the object classes,
255 the "void" band around object outlines and hard regions, ignored in loss and metrics. Reading the palette
indices directly keeps 255 as 255; d2l decodes the masks as RGB and maps colours through ``VOC_COLORMAP``, which
silently turned the boundary colour (224, 224, 192) into background (erratum 7). RGB-coded masks are still
accepted here, with the boundary colour mapped to 255 and any other unknown colour rejected.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cvtasks import storage
from cvtasks.errors import DataFormatError
from cvtasks.images import decode_image, decode_rgb
from cvtasks.pictures import overlay

DEVKIT_DIR = "VOCdevkit"
YEAR_DIR = "VOC2012"
IMAGES_DIR = "JPEGImages"
MASKS_DIR = "SegmentationClass"
SPLITS_DIR = ("ImageSets", "Segmentation")
IMAGE_SUFFIX = ".jpg"
MASK_SUFFIX = ".png"

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv/monitor",
)  # fmt: skip
NUM_CLASSES = len(VOC_CLASSES)
#: RGB colour of each class in ``VOC_CLASSES`` order: the first 21 entries of the VOC palette.
VOC_COLORMAP: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
    (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128),
)  # fmt: skip
#: Mask value of pixels ignored by loss and metrics (object outlines, "difficult" regions).
IGNORE_INDEX = 255
#: Colour of ``IGNORE_INDEX`` in the VOC palette, and of the boundary band in RGB-coded masks.
BOUNDARY_COLOR = (224, 224, 192)
PALETTE_SIZE = 256
BITS_PER_CHANNEL = 8


def voc_palette() -> np.ndarray:
    """The 256-colour VOC palette as a uint8 array of shape (256, 3).

    VOC's devkit spreads the bits of each index over the channels, most significant first: bit 0 of the index
    feeds red, bit 1 green, bit 2 blue, then the next three bits one place lower, and so on. Entries 0..20 are
    ``VOC_COLORMAP``; entry 255 is ``BOUNDARY_COLOR``.
    """
    palette = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    for index in range(PALETTE_SIZE):
        value = index
        for shift in range(BITS_PER_CHANNEL - 1, -1, -1):
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
    return palette


def split_file(root: str, split: str) -> str:
    return storage.join(root, DEVKIT_DIR, YEAR_DIR, *SPLITS_DIR, f"{split}.txt")


def index(root: str, split: str) -> pd.DataFrame:
    """One row per image id listed in ``ImageSets/Segmentation/<split>.txt``.

    Columns: ``image_path``, ``mask_path`` (str, paths or URIs of the JPEG and the class PNG) and ``name`` (the id).
    An id whose image or mask file is missing raises :class:`DataFormatError` naming the missing file and the row
    of the split file (1-based). The two folders are listed once instead of probing each file, so the check costs
    two listings on object storage too.
    """
    voc = storage.join(root, DEVKIT_DIR, YEAR_DIR)
    listing = split_file(root, split)
    names = _read_split(listing)
    images_dir, masks_dir = storage.join(voc, IMAGES_DIR), storage.join(voc, MASKS_DIR)
    present_images, present_masks = set(storage.list_dir(images_dir)), set(storage.list_dir(masks_dir))
    expected = ((images_dir, IMAGE_SUFFIX, present_images), (masks_dir, MASK_SUFFIX, present_masks))
    for row, name in names:
        for folder, suffix, present in expected:
            if name + suffix not in present:
                missing = storage.join(folder, name + suffix)
                raise DataFormatError(missing, f"listed as {name!r} in {listing} (row {row}) but the file is missing")
    ids = [name for _, name in names]
    return pd.DataFrame({
        "image_path": [storage.join(images_dir, name + IMAGE_SUFFIX) for name in ids],
        "mask_path": [storage.join(masks_dir, name + MASK_SUFFIX) for name in ids],
        "name": ids,
    })


def _read_split(listing: str) -> list[tuple[int, str]]:
    """(1-based row, id) for each non-empty line of a split file; an id listed twice is an error (it would weigh
    its sample twice)."""
    try:
        text = storage.read_bytes(listing).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(listing, f"split file is not UTF-8 text ({exc})") from exc
    first_rows: dict[str, int] = {}
    for row, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if "/" in name or " " in name:
            raise DataFormatError(listing, f"expected one image id per line, got {line!r}", row=row)
        if name in first_rows:
            raise DataFormatError(listing, f"image id {name!r} listed again (first on row {first_rows[name]})",
                                  row=row)
        first_rows[name] = row
    return [(row, name) for name, row in first_rows.items()]


def decode_mask(data: bytes, path: object) -> np.ndarray:
    """Class-index mask of shape (H, W), uint8 with values in 0..20 or ``IGNORE_INDEX``.

    Palette ("P") and single-channel ("L") PNGs hold class indices directly. RGB(A) PNGs are mapped through
    ``VOC_COLORMAP`` (``BOUNDARY_COLOR`` -> ``IGNORE_INDEX``). Any other value raises :class:`DataFormatError`
    naming ``path`` and the offending index or colour; so does a file that does not decode (see
    :func:`cvtasks.images.decode_image`).
    """
    img = decode_image(data, path)
    if img.mode in ("P", "L"):
        return _check_indices(np.asarray(img, dtype=np.uint8), path)
    if img.mode in ("RGB", "RGBA"):
        return rgb_to_mask(np.asarray(img.convert("RGB")), path)
    raise DataFormatError(path, f"unsupported mask image mode {img.mode!r}: expected a palette (P), L or RGB PNG")


def _check_indices(mask: np.ndarray, path: object) -> np.ndarray:
    values = np.unique(mask)
    bad = values[(values >= NUM_CLASSES) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataFormatError(
            path, f"mask holds class index {int(bad[0])} (valid: 0..{NUM_CLASSES - 1} and {IGNORE_INDEX} for ignore)"
        )
    return mask


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def rgb_to_mask(rgb: np.ndarray, path: object) -> np.ndarray:
    """Map an RGB-coded mask (H, W, 3) to class indices (H, W) uint8 through ``VOC_COLORMAP``.

    ``BOUNDARY_COLOR`` becomes ``IGNORE_INDEX``; any other colour outside the colormap raises
    :class:`DataFormatError` naming ``path`` and the colour, instead of silently becoming background.
    """
    known = np.array(VOC_COLORMAP + (BOUNDARY_COLOR,), dtype=np.uint8)
    labels = np.array(list(range(NUM_CLASSES)) + [IGNORE_INDEX], dtype=np.uint8)
    known_codes = _rgb_codes(known)
    order = np.argsort(known_codes)
    codes = _rgb_codes(rgb[..., :3])
    position = np.clip(np.searchsorted(known_codes[order], codes), 0, len(order) - 1)
    found = known_codes[order][position] == codes
    if not found.all():
        row, col = np.argwhere(~found)[0]
        colour = tuple(int(c) for c in rgb[row, col, :3])
        raise DataFormatError(
            path, f"mask colour {colour} at pixel (row {row}, col {col}) is not a VOC class colour "
                  f"({int((~found).sum())} such pixels)"
        )
    return labels[order][position]


def read_sample(image_path: str, mask_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one image (H, W, 3) uint8 and its class mask (H, W) uint8; sizes must agree."""
    image = decode_rgb(storage.read_bytes(image_path), image_path)
    mask = decode_mask(storage.read_bytes(mask_path), mask_path)
    if mask.shape != image.shape[:2]:
        raise DataFormatError(
            mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
                       f"{image.shape[1]}x{image.shape[0]}"
        )
    return image, mask


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A class mask (H, W) uint8 as a VOC palette PNG: both class indices and VOC colours in one file."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    img.putpalette(voc_palette().reshape(-1).tolist())  # turns the "L" image into "P", keeping the indices
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a class mask as a VOC palette PNG (readable back by :func:`decode_mask`)."""
    path = Path(path)
    path.write_bytes(encode_mask_png(mask))
    return path


def write_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> Path:
    """Write an image (H, W, 3) uint8 with its class mask blended over it in VOC colours, as PNG."""
    path = Path(path)
    Image.fromarray(overlay(image, mask, voc_palette(), alpha)).save(path, format="PNG")
    return path
