"""The banana-detection layout of d2l 13.6, with any number of objects per image.

Layout under a dataset root (local path or URI)::

    banana-detection/bananas_train/images/<img_name>      PNG images
    banana-detection/bananas_train/label.csv              img_name,label,xmin,ymin,xmax,ymax
    banana-detection/bananas_val/...                      the same for the validation split

Each CSV row is one object: a class id and a box in pixels, (xmin, ymin) its top-left and (xmax, ymax) its
bottom-right corner, 0 <= xmin < xmax <= image width (likewise y). Several rows may name the same image. d2l's
reader assumed one box per image and 256x256 images; here boxes are grouped per image and normalised by each
image's own size when it is decoded.

Errors name the label file and the row (the line number in label.csv; the header is line 1). The index checks what
the CSV and the image listing alone can tell (fields, class ids, box order, missing images); :func:`read_sample`
checks boxes against the decoded image's size. With ``skip_bad`` a bad image is not an error: its index row
carries the problem (column ``problem``), and the task's decode marks it to be skipped and counted.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pandas as pd

from cvtasks import storage
from cvtasks.errors import DataFormatError
from cvtasks.images import decode_rgb

DATASET_DIR = "banana-detection"
#: raycv split -> folder of the split.
SPLIT_DIRS = {"train": "bananas_train", "val": "bananas_val"}
IMAGES_DIR = "images"
LABEL_FILE = "label.csv"
COLUMNS = ("img_name", "label", "xmin", "ymin", "xmax", "ymax")
FIRST_DATA_LINE = 2  # line numbers count the header as line 1
#: Columns of a box row: class id, then corners (pixels in the index, fractions of the image once decoded).
BOX_FIELDS = 5


def split_dir(root: str, split: str) -> str:
    if split not in SPLIT_DIRS:
        raise ValueError(f'Unknown split "{split}": use {" or ".join(SPLIT_DIRS)}')
    return storage.join(root, DATASET_DIR, SPLIT_DIRS[split])


def label_file(root: str, split: str) -> str:
    return storage.join(split_dir(root, split), LABEL_FILE)


def index(root: str, split: str, num_classes: int, skip_bad: bool = False) -> pd.DataFrame:
    """One row per image named in ``split``'s label.csv, in order of first appearance.

    Columns: ``path`` (str), ``boxes`` (float32 (K, 5) rows class, xmin, ymin, xmax, ymax in pixels), ``rows``
    (int64 (K,) their lines in the label file), ``label_file`` (str) and ``problem`` (str, empty when the rows are
    fine). A bad row raises :class:`DataFormatError` naming the label file and line, unless ``skip_bad``: then the
    image's ``problem`` holds the message (its first bad row) and the image is to be skipped. A label file without
    rows is an error either way.
    """
    labels = label_file(root, split)
    images_dir = storage.join(split_dir(root, split), IMAGES_DIR)
    present = set(storage.list_dir(images_dir))
    rows_read = _read_rows(labels)
    if not rows_read:
        raise DataFormatError(labels, "label file has a header but no rows")
    grouped: dict[str, tuple[list[list[float]], list[int], list[str]]] = {}
    for line, fields in rows_read:
        name = fields[0] if fields else ""
        boxes, rows, problems = grouped.setdefault(name, ([], [], []))
        try:
            boxes.append(parse_row(fields, num_classes))
            if name not in present:
                raise ValueError(f"image {storage.join(images_dir, name)} is missing")
        except ValueError as exc:
            error = DataFormatError(labels, str(exc), row=line)
            if not skip_bad:
                raise error from None
            problems.append(str(error))
        rows.append(line)
    return pd.DataFrame({
        "path": [storage.join(images_dir, name) for name in grouped],
        "boxes": [_box_array(boxes) for boxes, _, _ in grouped.values()],
        "rows": [np.asarray(rows, dtype=np.int64) for _, rows, _ in grouped.values()],
        "label_file": [labels] * len(grouped),
        "problem": [problems[0] if problems else "" for _, _, problems in grouped.values()],
    })


def _box_array(boxes: list[list[float]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, BOX_FIELDS)


def _read_rows(path: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty data row; the header must be ``COLUMNS``."""
    try:
        text = storage.read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"label file is not UTF-8 text ({exc})") from exc
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if tuple(header) != COLUMNS:
        raise DataFormatError(path, f"header must be {','.join(COLUMNS)}, got {','.join(header) or 'nothing'}",
                              row=1)
    return [(reader.line_num, [f.strip() for f in fields]) for fields in reader if any(f.strip() for f in fields)]


def parse_row(fields: list[str], num_classes: int) -> list[float]:
    """One CSV row -> [class, xmin, ymin, xmax, ymax] (pixels); ValueError says what is wrong with it."""
    if len(fields) != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} fields ({','.join(COLUMNS)}), got {len(fields)}")
    values = []
    for column, field in zip(COLUMNS[1:], fields[1:]):
        try:
            value = float(field)
        except ValueError:
            raise ValueError(f"{column} is not a number: {field!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{column} is not a finite number: {field!r}")
        values.append(value)
    label, xmin, ymin, xmax, ymax = values
    if label != int(label) or not 0 <= label < num_classes:
        raise ValueError(f"unknown class id {fields[1]!r} (valid: 0..{num_classes - 1})")
    if xmin >= xmax or ymin >= ymax:
        raise ValueError(f"inverted or empty box: xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}")
    if xmin < 0 or ymin < 0:
        raise ValueError(f"box starts outside the image: xmin={xmin:g} ymin={ymin:g}")
    return values


def normalize_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel rows (class, x1, y1, x2, y2) -> the same with x divided by ``width`` and y by ``height``."""
    scale = np.array([1.0, width, height, width, height], dtype=np.float32)
    return (np.asarray(boxes, dtype=np.float32) / scale).astype(np.float32)


def read_sample(path: str, boxes: np.ndarray, rows: np.ndarray, labels: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode image ``path`` -> (uint8 (H, W, 3), boxes normalised by its size).

    A box reaching past the image's right or bottom edge raises :class:`DataFormatError` naming label file
    ``labels`` and the box's line (``rows``).
    """
    image = decode_rgb(storage.read_bytes(path), path)
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, BOX_FIELDS)
    outside = (boxes[:, 3] > width) | (boxes[:, 4] > height)
    if outside.any():
        i = int(np.argmax(outside))
        raise DataFormatError(labels, f"box {boxes[i, 1:].tolist()} reaches outside image {path} "
                                      f"({width}x{height} pixels, WxH)", row=int(rows[i]))
    return image, normalize_boxes(boxes, height, width)
