"""CIFAR-10 "python version": the on-disk layout, and a loader that never runs code from the pickles.

Layout under a dataset root (local path or URI)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5   training batches (10000 images each in the real set)
    cifar-10-batches-py/test_batch                      test batch, raycv's "val" split
    cifar-10-batches-py/batches.meta                    {b"label_names": [b"airplane", ...], b"num_vis": 3072, ...}

Each batch is a Python 2 pickle (protocol 2) of a dict with bytes keys:

    b"data"         numpy uint8 (N, 3072): per image the 32x32 red plane, then green, then blue, each row-major
    b"labels"       list of N ints in [0, number of label names)
    b"batch_label"  bytes;  b"filenames": list of N bytes

Unpickling may call any importable function the file names, so files load through :class:`SafeUnpickler`, which
resolves only the globals of numpy's array reconstruction. Python 2 ``str`` objects load as ``bytes``
(``encoding="bytes"``), as the dataset's own instructions say.

Decoding is a reshape of the raw bytes, done for a whole batch at once: the index carries each image's 3072 bytes.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pandas as pd

from cvtasks import storage
from cvtasks.errors import DataFormatError

try:  # numpy >= 2 moved the implementation to numpy._core; pickles name either module
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

DATASET_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
SPLIT_FILES: dict[str, tuple[str, ...]] = {"train": TRAIN_FILES, "val": (TEST_FILE,)}

CHANNELS, HEIGHT, WIDTH = 3, 32, 32
ROW_BYTES = CHANNELS * HEIGHT * WIDTH  # 3072 bytes per image

#: The only globals a CIFAR pickle may name: numpy's array reconstruction, under its numpy 1.x and 2.x modules.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`; any other global raises DataFormatError."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataFormatError(
                self.path, f"forbidden global {module}.{name} in pickle (only numpy array reconstruction is allowed)"
            ) from None


def safe_load(data: bytes, path: str) -> Any:
    """The object pickled in ``data`` (read from ``path``), loaded through :class:`SafeUnpickler`."""
    try:
        return SafeUnpickler(data, path).load()
    except DataFormatError:
        raise
    except Exception as exc:  # any failure while unpickling untrusted bytes means the file is unreadable
        raise DataFormatError(path, f"truncated or not a CIFAR pickle ({type(exc).__name__}: {exc})") from exc


def _load_dict(path: str) -> dict:
    loaded = safe_load(storage.read_bytes(path), path)
    if not isinstance(loaded, dict):
        raise DataFormatError(path, f"expected a pickled dict, got {type(loaded).__name__}")
    return loaded


def read_label_names(root: str) -> list[str]:
    """Class names in label order, from ``batches.meta`` under dataset root ``root``."""
    path = storage.join(root, DATASET_DIR, META_FILE)
    names = _load_dict(path).get(b"label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
        raise DataFormatError(path, "b'label_names' must be a non-empty list of bytes")
    try:
        decoded = [n.decode("utf-8") for n in names]
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"b'label_names' holds a name that is not UTF-8 ({exc})") from exc
    if len(set(decoded)) != len(decoded):
        raise DataFormatError(path, f"b'label_names' repeats a name: {decoded}")
    return decoded


def _labels(value: object, path: str, num_classes: int) -> np.ndarray:
    """``b'labels'`` (a list of ints, or an integer array) as int64 (N,), each in [0, ``num_classes``).

    Checked value by value before any conversion: numpy would truncate 1.7 to 1, turn True into 1 and overflow on
    ints beyond 64 bits.
    """
    items = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(items, (list, tuple)):
        raise DataFormatError(path, f"b'labels' must be a list of ints, got {type(value).__name__}")
    for row, label in enumerate(items):
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataFormatError(path, f"label {label!r} is a {type(label).__name__}, not an int", row=row)
        if not 0 <= label < num_classes:
            raise DataFormatError(path, f"label {label} outside [0, {num_classes})", row=row)
    return np.asarray(items, dtype=np.int64)


def read_batch(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) of one batch file, validated."""
    batch = _load_dict(path)
    for key in (b"data", b"labels"):
        if key not in batch:
            raise DataFormatError(path, f"missing key {key!r}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == ROW_BYTES):
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(path, f"b'data' must be a uint8 array of shape (N, {ROW_BYTES}), got {got}")
    labels = _labels(labels, path, num_classes)
    if labels.shape != (len(data),):
        raise DataFormatError(path, f"{len(data)} images but b'labels' has shape {labels.shape}")
    return data, labels


def index(root: str, split: str) -> pd.DataFrame:
    """One row per image of ``split`` ("train": data_batch_1..5, "val": test_batch).

    Columns: ``pixels`` (the image's 3072 raw bytes), ``label`` (int64), ``path`` and ``row`` (where it came from,
    for error messages).
    """
    if split not in SPLIT_FILES:
        raise ValueError(f'Unknown split "{split}": use {" or ".join(SPLIT_FILES)}')
    num_classes = len(read_label_names(root))
    frames = []
    for name in SPLIT_FILES[split]:
        path = storage.join(root, DATASET_DIR, name)
        data, labels = read_batch(path, num_classes)
        frames.append(pd.DataFrame({
            "pixels": [row.tobytes() for row in data],
            "label": labels,
            "path": path,
            "row": np.arange(len(data), dtype=np.int64),
        }))
    return pd.concat(frames, ignore_index=True)


def decode_pixels(pixels: np.ndarray, paths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Raw rows (a sequence of 3072-byte buffers) -> uint8 images (N, 32, 32, 3), in one reshape for the batch.

    ``paths`` and ``rows`` (aligned with ``pixels``) name the source of a row of the wrong length.
    """
    flat = np.frombuffer(b"".join(pixels), dtype=np.uint8)
    if flat.size != len(pixels) * ROW_BYTES:
        lengths = np.fromiter((len(p) for p in pixels), dtype=np.int64, count=len(pixels))
        bad = int(np.flatnonzero(lengths != ROW_BYTES)[0])
        raise DataFormatError(paths[bad], f"image has {lengths[bad]} bytes, expected {ROW_BYTES}", row=int(rows[bad]))
    return np.ascontiguousarray(flat.reshape(-1, CHANNELS, HEIGHT, WIDTH).transpose(0, 2, 3, 1))
