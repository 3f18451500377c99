"""Every malformed input of the four dataset formats and of style images ends in a DataFormatError naming the file
(and row) and the problem, or, for a bad sample under ``data.skip_bad``, in a counted skip: never in another
exception type or a silently wrong label.

Each case writes a small, valid dataset under ``tmp_path``, breaks one thing, and reads the dataset the way the
pipeline does (the task's ``index``, then ``decode`` of every row of both splits). Cases marked ``SAMPLE`` are bad
samples: with ``data.skip_bad`` they are skipped and counted instead.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvtasks.demo import cifar as cifar_demo
from cvtasks.errors import DataFormatError
from cvtasks.formats import banana, cifar, voc
from cvtasks.images import decode_rgb
from cvtasks.style import load_image
from cvtasks.tasks.banana import BananaTask
from cvtasks.tasks.base import Task
from cvtasks.tasks.cifar10 import Cifar10Task
from cvtasks.tasks.hotdog import HotdogTask
from cvtasks.tasks.voc import VocTask
from pipelines.data import count_skipped
from tests.configs import typed_config

#: Pillow refuses images over twice this many pixels (DecompressionBombError); lowered so a bomb is a small file.
MAX_PIXELS = 2000
BOMB_SIDE = 100  # 10000 pixels > 2 * MAX_PIXELS
SIDE = 8  # every ordinary test image is SIDE x SIDE
STYLE_SIDE = 40  # style images need 32 px a side
SAMPLE, FILE = True, False  # a bad sample (skippable under data.skip_bad) or a bad file / folder (always an error)

Corrupt = Callable[[Path], Path]  # breaks the dataset under a root; returns the file the error must name


@pytest.fixture(autouse=True)
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)


# --- files -----------------------------------------------------------------------------------------------------------

def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgb(side: int = SIDE) -> Image.Image:
    return Image.new("RGB", (side, side), (200, 30, 90))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def overwrite(relative: str, data: Callable[[Path], bytes]) -> Corrupt:
    """Replace file ``relative`` (under the root) by ``data(old file)``."""

    def corrupt(root: Path) -> Path:
        return write(root / relative, data(root / relative))

    return corrupt


def truncated(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: len(raw) // 2]


def empty(_: Path) -> bytes:
    return b""


def text(_: Path) -> bytes:
    return b"this is not an image\n"


def bomb_png(_: Path) -> bytes:
    return encoded(rgb(BOMB_SIDE), "PNG")


def bomb_jpeg(_: Path) -> bytes:
    return encoded(rgb(BOMB_SIDE), "JPEG")


def float_tiff(_: Path) -> bytes:
    """A float ("F") image, whatever its file name says: no colour meaning to convert to RGB."""
    return encoded(Image.fromarray(np.full((SIDE, SIDE), 0.5, np.float32)), "TIFF")


def removed(relative: str) -> Corrupt:
    def corrupt(root: Path) -> Path:
        path = root / relative
        path.unlink()
        return path

    return corrupt


def folder_instead_of_file(relative: str) -> Corrupt:
    def corrupt(root: Path) -> Path:
        path = root / relative
        path.unlink()
        path.mkdir()
        return path

    return corrupt


def assert_names(read: Callable[[], object], path: Path, problem: str, row: int | None = None) -> None:
    with pytest.raises(DataFormatError) as err:
        read()
    assert err.value.path == str(path), str(err.value)
    assert re.search(problem, err.value.problem), str(err.value)
    if row is not None:
        assert err.value.row == row, str(err.value)


def skipped_rows(task: Task, root: Path, partial: dict) -> int:
    """Index and decode both splits as the pipeline does (the task's config with the values of ``partial``); the
    number of rows decode marks ``keep=False``."""
    cfg = typed_config(task.name, partial, root)
    skipped = 0
    for split in ("train", "val"):
        index = task.index(split, cfg)
        decoded = task.decode({c: index[c].to_numpy() for c in index.columns}, cfg)
        skipped += int((~np.asarray(decoded.get("keep", np.ones(len(index), bool)), dtype=bool)).sum())
    return skipped


def cases(table: list[tuple]) -> list:
    """``(id, corrupt, problem regex, row, SAMPLE|FILE)`` rows -> pytest params."""
    return [pytest.param(*row, id=row[0]) for row in table]


def sample_cases(table: list[tuple]) -> list:
    return [pytest.param(row[1], id=row[0]) for row in table if row[4] is SAMPLE]


# --- CIFAR-10 python batches -----------------------------------------------------------------------------------------

CIFAR = cifar.DATASET_DIR
GOOD_DATA = np.zeros((2, cifar.ROW_BYTES), np.uint8)


def make_cifar(root: Path) -> None:
    cifar_demo.write(root, seed=0, n_train=10, n_test=4)  # 2 images per training batch


def batch(obj: object, name: str = "data_batch_2") -> Corrupt:
    return overwrite(f"{CIFAR}/{name}", lambda _: pickle.dumps(obj, protocol=4))


def labels(values: object) -> Corrupt:
    return batch({b"data": GOOD_DATA, b"labels": values})


def data(pixels: object) -> Corrupt:
    return batch({b"data": pixels, b"labels": [0, 1]})


def meta(names: object) -> Corrupt:
    return batch({b"label_names": names, b"num_vis": cifar.ROW_BYTES}, cifar.META_FILE)


class Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


CIFAR_TABLE = [
    ("float-label", labels([0, 1.7]), r"label 1\.7 is a float, not an int", 1, FILE),
    ("bool-label", labels([True, 0]), "label True is a bool", 0, FILE),
    ("huge-int-label", labels([0, 2**70]), rf"label {2**70} outside \[0, 10\)", 1, FILE),
    ("negative-label", labels([-1, 0]), r"label -1 outside \[0, 10\)", 0, FILE),
    ("label-equal-to-class-count", labels([0, 10]), r"label 10 outside \[0, 10\)", 1, FILE),
    ("float-label-array", labels(np.array([0.0, 2.5])), "label 0.0 is a float", 0, FILE),
    ("labels-as-bytes", labels(b"\x00\x01"), "b'labels' must be a list of ints, got bytes", None, FILE),
    ("fewer-labels-than-images", labels([0]), "2 images but b'labels' has shape", None, FILE),
    ("missing-labels-key", batch({b"data": GOOD_DATA}), "missing key b'labels'", None, FILE),
    ("missing-data-key", batch({b"labels": [0, 1]}), "missing key b'data'", None, FILE),
    ("float-data", data(GOOD_DATA.astype(np.float32)), r"got float32 array of shape \(2, 3072\)", None, FILE),
    ("int64-data", data(GOOD_DATA.astype(np.int64)), r"got int64 array of shape \(2, 3072\)", None, FILE),
    ("flat-data", data(GOOD_DATA.reshape(-1)), r"shape \(N, 3072\), got uint8 array of shape \(6144,\)", None, FILE),
    ("short-rows", data(GOOD_DATA[:, :100]), r"shape \(N, 3072\), got uint8 array of shape \(2, 100\)", None, FILE),
    ("data-as-list", data([[0] * 3072] * 2), "got list$", None, FILE),
    ("not-a-dict", batch([GOOD_DATA, [0, 1]]), "expected a pickled dict, got list", None, FILE),
    ("truncated-batch", overwrite(f"{CIFAR}/data_batch_2", truncated), "truncated or not a CIFAR pickle", None, FILE),
    ("empty-batch-file", overwrite(f"{CIFAR}/test_batch", empty), "truncated or not a CIFAR pickle", None, FILE),
    ("text-not-pickle", overwrite(f"{CIFAR}/data_batch_1", text), "truncated or not a CIFAR pickle", None, FILE),
    ("code-in-pickle", batch({b"data": Exploit(), b"labels": []}), "forbidden global", None, FILE),
    ("missing-batch-file", removed(f"{CIFAR}/data_batch_4"), "cannot read file", None, FILE),
    ("batch-is-a-folder", folder_instead_of_file(f"{CIFAR}/data_batch_5"), "cannot read file", None, FILE),
    ("missing-meta", removed(f"{CIFAR}/{cifar.META_FILE}"), "cannot read file", None, FILE),
    ("non-utf8-label-name", meta([b"cat", b"\xff\xfe"] + [b"x%d" % i for i in range(8)]), "not UTF-8", None, FILE),
    ("label-names-as-str", meta(["cat", "dog"]), "non-empty list of bytes", None, FILE),
    ("no-label-names", meta([]), "non-empty list of bytes", None, FILE),
    ("repeated-label-name", meta([b"cat", b"cat"] + [b"x%d" % i for i in range(8)]), "repeats a name", None, FILE),
]


@pytest.mark.parametrize(("case", "corrupt", "problem", "row", "kind"), cases(CIFAR_TABLE))
def test_cifar(tmp_path, case, corrupt, problem, row, kind):
    make_cifar(tmp_path)
    bad = corrupt(tmp_path)
    cfg = {"data": {"root": str(tmp_path), "skip_bad": True}}
    assert_names(lambda: skipped_rows(Cifar10Task(), tmp_path, cfg), bad, problem, row)


def test_cifar_reads_when_nothing_is_broken(tmp_path):
    make_cifar(tmp_path)
    assert skipped_rows(Cifar10Task(), tmp_path, {"data": {"root": str(tmp_path), "skip_bad": False}}) == 0


# --- image folders (hotdog) ------------------------------------------------------------------------------------------

def make_hotdog(root: Path) -> None:
    """d/{train,test}/{dog,hotdog}/: two PNGs and a JPEG per training class, one PNG per test class."""
    for name in ("dog", "hotdog"):
        for file in ("0.png", "1.png"):
            write(root / "d" / "train" / name / file, encoded(rgb(), "PNG"))
        write(root / "d" / "train" / name / "2.jpg", encoded(rgb(), "JPEG"))
        write(root / "d" / "test" / name / "0.png", encoded(rgb(), "PNG"))


def hotdog_cfg(skip_bad: bool) -> dict:
    return {"data": {"dataset": "d", "skip_bad": skip_bad}}


def rename(old: str, new: str, named: str) -> Corrupt:
    def corrupt(root: Path) -> Path:
        (root / new).parent.mkdir(parents=True, exist_ok=True)
        (root / old).rename(root / new)
        return root / named

    return corrupt


def empty_class(root: Path) -> Path:
    for file in (root / "d" / "train" / "dog").iterdir():
        file.unlink()
    write(root / "d" / "train" / "dog" / "readme.txt", b"no images")
    return root / "d" / "train" / "dog"


def no_class_folders(root: Path) -> Path:
    for name in ("dog", "hotdog"):
        (root / "d" / "test" / name / "0.png").rename(root / "d" / "test" / f"{name}.png")
        (root / "d" / "test" / name).rmdir()
    return root / "d" / "test"


HOTDOG_TABLE = [
    ("val-missing-a-class", rename("d/test/dog", "elsewhere/dog", "d/test"), r"\['dog'\] of the train split", None,
     FILE),
    ("val-extra-class", rename("d/test/dog/0.png", "d/test/cat/0.png", "d/test/cat"),
     "class folder not in the train split", None, FILE),
    ("missing-train-split", rename("d/train", "elsewhere", "d/train"), "split folder of 'train' not found", None, FILE),
    ("missing-test-split", rename("d/test", "elsewhere", "d/test"), "split folder of 'val' not found", None, FILE),
    ("class-folder-without-images", empty_class, "class folder has no", None, FILE),
    ("split-without-class-folders", no_class_folders, "no class folders", None, FILE),
    ("truncated-png", overwrite("d/train/dog/1.png", truncated), "not a readable image", None, SAMPLE),
    ("truncated-jpeg", overwrite("d/train/hotdog/2.jpg", truncated), "not a readable image", None, SAMPLE),
    ("zero-byte-png", overwrite("d/test/hotdog/0.png", empty), r"not a readable image \(the file is empty", None,
     SAMPLE),
    ("text-named-jpg", overwrite("d/train/dog/2.jpg", text), "no image format recognised", None, SAMPLE),
    ("decompression-bomb", overwrite("d/train/hotdog/0.png", bomb_png), "DecompressionBombError", None, SAMPLE),
    ("float-image-mode", overwrite("d/train/dog/0.png", float_tiff), "unsupported image mode 'F'", None, SAMPLE),
    ("folder-named-like-an-image", folder_instead_of_file("d/train/dog/1.png"), "cannot read file", None, SAMPLE),
]


@pytest.mark.parametrize(("case", "corrupt", "problem", "row", "kind"), cases(HOTDOG_TABLE))
def test_image_folder(tmp_path, case, corrupt, problem, row, kind):
    make_hotdog(tmp_path)
    bad = corrupt(tmp_path)
    assert_names(lambda: skipped_rows(HotdogTask(), tmp_path, hotdog_cfg(skip_bad=False)), bad, problem, row)


@pytest.mark.parametrize("corrupt", sample_cases(HOTDOG_TABLE))
def test_image_folder_skip_bad_counts_the_bad_image(tmp_path, corrupt):
    make_hotdog(tmp_path)
    corrupt(tmp_path)
    assert skipped_rows(HotdogTask(), tmp_path, hotdog_cfg(skip_bad=True)) == 1


def test_image_folder_reads_when_nothing_is_broken(tmp_path):
    make_hotdog(tmp_path)
    assert skipped_rows(HotdogTask(), tmp_path, hotdog_cfg(skip_bad=False)) == 0


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    deep = np.full((SIDE, SIDE), 257 * 100, np.uint16)  # 100 in 8 bits; a plain RGB conversion clips it to 255
    decoded = decode_rgb(encoded(Image.fromarray(deep), "PNG"), "deep.png")
    assert decoded.shape == (SIDE, SIDE, 3) and (decoded == 100).all()


# --- banana detection: label.csv + PNGs ------------------------------------------------------------------------------

BANANA = f"{banana.DATASET_DIR}/{banana.SPLIT_DIRS['train']}"
LABELS = f"{BANANA}/{banana.LABEL_FILE}"
HEADER = ",".join(banana.COLUMNS)
GOOD_ROWS = ["a.png,0,1,1,5,5", "b.png,1,0,0,8,8"]


def make_banana(root: Path) -> None:
    for split in banana.SPLIT_DIRS.values():
        folder = root / banana.DATASET_DIR / split
        for name in ("a.png", "b.png"):
            write(folder / banana.IMAGES_DIR / name, encoded(rgb(), "PNG"))
        write(folder / banana.LABEL_FILE, "\n".join([HEADER, *GOOD_ROWS, ""]).encode())


def banana_cfg(skip_bad: bool) -> dict:
    return {"data": {"classes": ["banana", "apple"], "max_objects": 2, "skip_bad": skip_bad}}


def label_rows(*rows: str) -> Corrupt:
    """Training label.csv with the good rows, then ``rows`` (the first of them on line 4)."""
    return overwrite(LABELS, lambda _: "\n".join([HEADER, *GOOD_ROWS, *rows, ""]).encode())


BANANA_TABLE = [
    ("non-utf8-label-file", overwrite(LABELS, lambda _: b"img_name,\xff\xfe\n"), "not UTF-8 text", None, FILE),
    ("empty-label-file", overwrite(LABELS, empty), "header must be .* got nothing", 1, FILE),
    ("header-only", overwrite(LABELS, lambda _: (HEADER + "\n").encode()), "header but no rows", None, FILE),
    ("wrong-header", overwrite(LABELS, lambda _: b"name,label,x1,y1,x2,y2\na.png,0,1,1,5,5\n"), "header must be", 1,
     FILE),
    ("missing-label-file", removed(LABELS), "cannot read file", None, FILE),
    ("missing-images-folder", rename(f"{BANANA}/images", "elsewhere", f"{BANANA}/images"), "directory not found",
     None, FILE),
    ("too-few-fields", label_rows("a.png,0,1,1,5"), "expected 6 fields", 4, SAMPLE),
    ("too-many-fields", label_rows("a.png,0,1,1,5,5,9"), "expected 6 fields", 4, SAMPLE),
    ("not-a-number", label_rows("a.png,0,1,one,5,5"), "ymin is not a number: 'one'", 4, SAMPLE),
    ("nan-coordinate", label_rows("a.png,0,1,1,5,nan"), "ymax is not a finite number", 4, SAMPLE),
    ("inf-coordinate", label_rows("a.png,0,1,1,inf,5"), "xmax is not a finite number", 4, SAMPLE),
    ("unknown-class-id", label_rows("a.png,2,1,1,5,5"), r"unknown class id '2' \(valid: 0..1\)", 4, SAMPLE),
    ("negative-class-id", label_rows("a.png,-1,1,1,5,5"), "unknown class id '-1'", 4, SAMPLE),
    ("fractional-class-id", label_rows("a.png,0.5,1,1,5,5"), "unknown class id '0.5'", 4, SAMPLE),
    ("inverted-box", label_rows("a.png,0,6,1,5,5"), "inverted or empty box", 4, SAMPLE),
    ("empty-box", label_rows("a.png,0,1,5,5,5"), "inverted or empty box", 4, SAMPLE),
    ("box-starting-outside", label_rows("a.png,0,-1,1,5,5"), "box starts outside the image", 4, SAMPLE),
    ("missing-image", label_rows("gone.png,0,1,1,5,5"), r"image .*gone\.png is missing", 4, SAMPLE),
    ("box-past-the-image", label_rows("a.png,0,1,1,9,5"), r"reaches outside image .*a\.png \(8x8", 4, SAMPLE),
    ("more-boxes-than-max-objects", label_rows("b.png,0,1,1,2,2", "b.png,0,2,2,3,3"), "has 3 boxes but", 5, FILE),
    ("text-named-png", overwrite(f"{BANANA}/images/a.png", text), "not a readable image", None, SAMPLE),
    ("truncated-png", overwrite(f"{BANANA}/images/b.png", truncated), "not a readable image", None, SAMPLE),
    ("zero-byte-png", overwrite(f"{BANANA}/images/a.png", empty), "not a readable image", None, SAMPLE),
    ("decompression-bomb", overwrite(f"{BANANA}/images/b.png", bomb_png), "DecompressionBombError", None, SAMPLE),
]


def banana_error_file(root: Path, bad: Path, row: int | None) -> Path:
    """Row errors name the label file; image errors the image."""
    return root / LABELS if row is not None and bad.name != banana.LABEL_FILE else bad


@pytest.mark.parametrize(("case", "corrupt", "problem", "row", "kind"), cases(BANANA_TABLE))
def test_banana(tmp_path, case, corrupt, problem, row, kind):
    make_banana(tmp_path)
    bad = corrupt(tmp_path)
    read = lambda: skipped_rows(BananaTask(), tmp_path, banana_cfg(skip_bad=False))  # noqa: E731
    assert_names(read, banana_error_file(tmp_path, bad, row), problem, row)


@pytest.mark.parametrize("corrupt", sample_cases(BANANA_TABLE))
def test_banana_skip_bad_counts_the_bad_image(tmp_path, corrupt):
    make_banana(tmp_path)
    corrupt(tmp_path)
    assert skipped_rows(BananaTask(), tmp_path, banana_cfg(skip_bad=True)) == 1


def test_banana_reads_when_nothing_is_broken(tmp_path):
    make_banana(tmp_path)
    assert skipped_rows(BananaTask(), tmp_path, banana_cfg(skip_bad=False)) == 0


# --- VOC2012 segmentation --------------------------------------------------------------------------------------------

VOC = f"{voc.DEVKIT_DIR}/{voc.YEAR_DIR}"
TRAIN_LIST = f"{VOC}/{'/'.join(voc.SPLITS_DIR)}/train.txt"


def mask_png(indices: np.ndarray) -> bytes:
    return voc.encode_mask_png(indices.astype(np.uint8))


def make_voc(root: Path) -> None:
    """Images a, b (train) and c (val), SIDE x SIDE, with palette masks of classes 0, 1 and the 255 band."""
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[2:5, 2:5], mask[1, :] = 1, voc.IGNORE_INDEX
    for name in "abc":
        write(root / VOC / voc.IMAGES_DIR / f"{name}.jpg", encoded(rgb(), "JPEG"))
        write(root / VOC / voc.MASKS_DIR / f"{name}.png", mask_png(mask))
    write(root / TRAIN_LIST, b"a\nb\n")
    write(root / TRAIN_LIST.replace("train.txt", "val.txt"), b"c\n")


def voc_cfg(skip_bad: bool) -> dict:
    return {"data": {"skip_bad": skip_bad}, "augment": {"crop_size": [SIDE, SIDE], "small": "pad", "hflip": 0.5}}


def listing(data: bytes) -> Corrupt:
    return overwrite(TRAIN_LIST, lambda _: data)


def mask_of(image: Image.Image) -> Callable[[Path], bytes]:
    return lambda _: encoded(image, "PNG")


def rgb_mask_with_unknown_colour(_: Path) -> bytes:
    colours = np.zeros((SIDE, SIDE, 3), np.uint8)
    colours[3, 4] = (1, 2, 3)
    return encoded(Image.fromarray(colours), "PNG")


IMAGE_B, MASK_B = f"{VOC}/{voc.IMAGES_DIR}/b.jpg", f"{VOC}/{voc.MASKS_DIR}/b.png"
VOC_TABLE = [
    ("missing-split-file", removed(TRAIN_LIST), "cannot read file", None, FILE),
    ("non-utf8-split-file", listing(b"a\n\xff\xfe\n"), "not UTF-8 text", None, FILE),
    ("id-with-a-space", listing(b"a\nb c\n"), "one image id per line", 2, FILE),
    ("id-with-a-path", listing(b"a\nx/b\n"), "one image id per line", 2, FILE),
    ("id-listed-twice", listing(b"a\nb\n\na\n"), r"'a' listed again \(first on row 1\)", 4, FILE),
    ("listed-image-missing", removed(IMAGE_B), r"listed as 'b' .* \(row 2\) but the file is missing", None, FILE),
    ("listed-mask-missing", removed(MASK_B), r"listed as 'b' .* \(row 2\) but the file is missing", None, FILE),
    ("missing-images-folder", rename(f"{VOC}/{voc.IMAGES_DIR}", "elsewhere", f"{VOC}/{voc.IMAGES_DIR}"),
     "directory not found", None, FILE),
    ("truncated-jpeg", overwrite(IMAGE_B, truncated), "not a readable image", None, SAMPLE),
    ("zero-byte-jpeg", overwrite(IMAGE_B, empty), "not a readable image", None, SAMPLE),
    ("image-decompression-bomb", overwrite(IMAGE_B, bomb_jpeg), "DecompressionBombError", None, SAMPLE),
    ("mask-not-an-image", overwrite(MASK_B, text), "not a readable image", None, SAMPLE),
    ("truncated-mask", overwrite(MASK_B, truncated), "not a readable image", None, SAMPLE),
    ("mask-decompression-bomb", overwrite(MASK_B, lambda _: mask_png(np.zeros((BOMB_SIDE, BOMB_SIDE)))),
     "DecompressionBombError", None, SAMPLE),
    ("mask-class-index-21", overwrite(MASK_B, lambda _: mask_png(np.full((SIDE, SIDE), 21))),
     "mask holds class index 21", None, SAMPLE),
    ("rgb-mask-unknown-colour", overwrite(MASK_B, rgb_mask_with_unknown_colour),
     r"mask colour \(1, 2, 3\) at pixel \(row 3, col 4\)", None, SAMPLE),
    ("mask-16-bit", overwrite(MASK_B, mask_of(Image.fromarray(np.zeros((SIDE, SIDE), np.uint16)))),
     "unsupported mask image mode 'I;16'", None, SAMPLE),
    ("mask-with-alpha", overwrite(MASK_B, mask_of(Image.new("LA", (SIDE, SIDE)))), "unsupported mask image mode 'LA'",
     None, SAMPLE),
    ("mask-of-another-size", overwrite(MASK_B, lambda _: mask_png(np.zeros((SIDE, SIDE + 1)))),
     rf"mask is {SIDE + 1}x{SIDE} \(WxH\) but its image", None, SAMPLE),
]


@pytest.mark.parametrize(("case", "corrupt", "problem", "row", "kind"), cases(VOC_TABLE))
def test_voc(tmp_path, case, corrupt, problem, row, kind):
    make_voc(tmp_path)
    bad = corrupt(tmp_path)
    assert_names(lambda: skipped_rows(VocTask(), tmp_path, voc_cfg(skip_bad=False)), bad, problem, row)


@pytest.mark.parametrize("corrupt", sample_cases(VOC_TABLE))
def test_voc_skip_bad_counts_the_bad_sample(tmp_path, corrupt):
    make_voc(tmp_path)
    corrupt(tmp_path)
    assert skipped_rows(VocTask(), tmp_path, voc_cfg(skip_bad=True)) == 1


def test_voc_reads_when_nothing_is_broken(tmp_path):
    make_voc(tmp_path)
    assert skipped_rows(VocTask(), tmp_path, voc_cfg(skip_bad=False)) == 0


# --- style images ----------------------------------------------------------------------------------------------------

def make_style(root: Path) -> None:
    write(root / "content.png", encoded(rgb(STYLE_SIDE), "PNG"))


STYLE_TABLE = [
    ("missing-file", removed("content.png"), "cannot read file", None, FILE),
    ("zero-byte-file", overwrite("content.png", empty), "not a readable image", None, FILE),
    ("not-an-image", overwrite("content.png", text), "not a readable image", None, FILE),
    ("truncated-png", overwrite("content.png", truncated), "not a readable image", None, FILE),
    ("too-small", overwrite("content.png", lambda _: encoded(rgb(20), "PNG")), "at least 32 px", None, FILE),
    ("decompression-bomb", overwrite("content.png", bomb_png), "DecompressionBombError", None, FILE),
    ("float-image-mode", overwrite("content.png", lambda _: encoded(
        Image.fromarray(np.zeros((STYLE_SIDE, STYLE_SIDE), np.float32)), "TIFF")), "unsupported image mode 'F'",
     None, FILE),
    ("a-folder", folder_instead_of_file("content.png"), "cannot read file", None, FILE),
]


@pytest.mark.parametrize(("case", "corrupt", "problem", "row", "kind"), cases(STYLE_TABLE))
def test_style_image(tmp_path, case, corrupt, problem, row, kind):
    make_style(tmp_path)
    bad = corrupt(tmp_path)
    assert_names(lambda: load_image(str(tmp_path / "content.png")), bad, problem, row)


def test_style_image_reads_when_nothing_is_broken(tmp_path):
    make_style(tmp_path)
    assert load_image(str(tmp_path / "content.png")).size == (STYLE_SIDE, STYLE_SIDE)


# --- the pipeline's count of skips ------------------------------------------------------------------------------------

class CountedDataset:
    """Stands in for a Ray Dataset: ``count`` returns the kept rows and records that it ran."""

    def __init__(self, kept: int) -> None:
        self.kept, self.counts = kept, 0

    def count(self) -> int:
        self.counts += 1
        return self.kept


@pytest.mark.parametrize(("cached", "skip_bad", "expected", "passes"), [
    (True, False, 3, 1),  # cached: counted from the blocks' metadata whether or not skip_bad is on
    (True, True, 3, 1),
    (False, True, 3, 1),  # streamed under skip_bad: one counting pass, so the skips are reported
    (False, False, None, 0),  # streamed without skip_bad: no extra pass
])
def test_skipped_rows_are_counted_whenever_skip_bad_is_on(cached, skip_bad, expected, passes):
    ds = CountedDataset(kept=7)
    assert count_skipped(ds, 10, cached=cached, skip_bad=skip_bad) == expected
    assert ds.counts == passes


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["stream", "memory"])
def test_build_split_counts_skips_streamed_or_cached(ray_cluster, tmp_path, cache):
    from pipelines.config import load_config
    from pipelines.data import build_split

    make_hotdog(tmp_path)
    overwrite("d/train/dog/1.png", truncated)(tmp_path)
    cfg = load_config("hotdog", overrides=[f"data.root={tmp_path}", "data.dataset=d", f"data.cache={cache}",
                                           "data.skip_bad=true", "augment.size=8"])
    split = build_split(HotdogTask(), cfg, "train", train=True)
    assert (split.cached, split.skipped, split.rows) == (cache == "memory", 1, 5)
    assert split.dataset.count() == 5
