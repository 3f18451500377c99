"""Image-folder classification datasets (d2l's hotdog), read like torchvision's ``ImageFolder``.

Layout under a dataset root (local path or URI)::

    <dataset>/train/<class>/*.png|jpg|jpeg
    <dataset>/test/<class>/*.png|jpg|jpeg      raycv's "val" split

``<dataset>`` is a config value (``data.dataset``), so one task reads ``hotdog`` as well as a larger dataset of the
same layout. As in torchvision, every sub-folder of a split is a class, classes are numbered in sorted name order,
and samples are listed class by class in sorted file-name order. Only files directly inside a class folder count,
and extensions match case-insensitively.

Unlike torchvision, where each split numbers the classes of its own folders (a ``test/`` without one class shifts
every later label by one), the train split's classes define the labels: a validation split with a class missing or
an extra one raises :class:`DataFormatError` naming the folder.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cvtasks import storage
from cvtasks.errors import DataFormatError
from cvtasks.images import decode_rgb, object_array

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: raycv split -> folder of the split in the dataset.
SPLIT_DIRS = {"train": "train", "val": "test"}


def split_dir(root: str, dataset: str, split: str) -> str:
    """The folder of ``split`` ("train" or "val") of ``dataset`` under ``root``; missing -> DataFormatError."""
    if split not in SPLIT_DIRS:
        raise ValueError(f'Unknown split "{split}": use {" or ".join(SPLIT_DIRS)}')
    folder = storage.join(root, dataset, SPLIT_DIRS[split])
    if not storage.is_dir(folder):
        raise DataFormatError(folder, f"split folder of {split!r} not found")
    return folder


def find_classes(folder: str) -> list[str]:
    """Sorted names of the class folders in split folder ``folder`` (torchvision's ``find_classes``)."""
    classes = [name for name in storage.list_dir(folder) if storage.is_dir(storage.join(folder, name))]
    if not classes:
        raise DataFormatError(folder, "no class folders")
    return classes


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_same_classes(folder: str, classes: list[str], train_folder: str, train_classes: list[str]) -> None:
    """Raise :class:`DataFormatError` unless split folder ``folder`` has exactly the train split's classes."""
    extra = sorted(set(classes) - set(train_classes))
    if extra:
        raise DataFormatError(storage.join(folder, extra[0]),
                              f"class folder not in the train split {train_folder} (its classes: {train_classes})")
    missing = sorted(set(train_classes) - set(classes))
    if missing:
        raise DataFormatError(folder, f"class folder(s) {missing} of the train split {train_folder} missing: "
                                      "labels are numbered from the train split's classes")


def index(root: str, dataset: str, split: str) -> pd.DataFrame:
    """One row per image of ``split``: ``path`` (str) and ``label`` (int64, the index of its class folder in the
    train split, whose classes every split must have)."""
    folder = split_dir(root, dataset, split)
    classes = find_classes(folder)
    if split != "train":
        train_folder = split_dir(root, dataset, "train")
        check_same_classes(folder, classes, train_folder, find_classes(train_folder))
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = storage.join(folder, name)
        files = [f for f in storage.list_dir(class_dir) if is_image_file(f)]
        if not files:
            raise DataFormatError(class_dir, f"class folder has no {'/'.join(IMAGE_EXTENSIONS)} images")
        paths += [storage.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    return pd.DataFrame({"path": paths, "label": np.asarray(labels, dtype=np.int64)})


#: Stand-in for an image that failed to decode under ``skip_bad``; its row has ``keep=False`` and is dropped.
PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)


def decode_images(paths: np.ndarray, skip_bad: bool) -> tuple[np.ndarray, np.ndarray]:
    """(object array of uint8 (H, W, 3) images, bool ``keep``) for image files ``paths``.

    A corrupt file raises DataFormatError naming it, unless ``skip_bad``: then it is logged, its image is
    :data:`PLACEHOLDER` and its ``keep`` is False, so the pipeline drops and counts it.
    """
    images, keep = [], np.ones(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            images.append(decode_rgb(storage.read_bytes(path), path))
        except DataFormatError as exc:
            if not skip_bad:
                raise
            log.warning("skipping bad image: %s", exc)
            images.append(PLACEHOLDER)
            keep[i] = False
    return object_array(images), keep
