"""Image-folder format (hotdog): torchvision's class and sample order, bad files and folders, the demo writers."""

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from cvtasks.demo import hotdog as demo
from cvtasks.errors import DataFormatError
from cvtasks.formats import imagefolder


def save_image(path, size=(8, 6), colour=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", size, colour).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path):
    """data/{train,test}/<class>/ with mixed extensions, case and a non-image file."""
    train = tmp_path / "data" / "train"
    for name in ("b.png", "a.JPG", "c.jpeg"):
        save_image(train / "zebra" / name)
    for name in ("10.png", "2.png"):
        save_image(train / "Apple" / name)
    save_image(train / "mango" / "x.PNG")
    (train / "mango" / "notes.txt").write_text("not an image")
    save_image(tmp_path / "data" / "test" / "mango" / "y.png")
    return tmp_path


def test_classes_and_samples_match_torchvision_image_folder(tree):
    reference = ImageFolder(str(tree / "data" / "train"))
    folder = imagefolder.split_dir(str(tree), "data", "train")
    assert {name: i for i, name in enumerate(imagefolder.find_classes(folder))} == reference.class_to_idx
    index = imagefolder.index(str(tree), "data", "train")
    assert list(zip(index["path"], index["label"], strict=True)) == reference.samples
    assert index["label"].dtype == np.int64


def test_val_split_reads_the_test_folder_with_the_train_splits_labels(tree):
    test = tree / "data" / "test"
    for name in ("Apple", "zebra"):
        save_image(test / name / "z.png")
    index = imagefolder.index(str(tree), "data", "val")
    assert index["path"].tolist() == [str(test / "Apple" / "z.png"), str(test / "mango" / "y.png"),
                                      str(test / "zebra" / "z.png")]
    assert index["label"].tolist() == [0, 1, 2]


def test_val_split_with_a_missing_or_extra_class_names_the_folder(tree):
    test = tree / "data" / "test"
    save_image(test / "zebra" / "z.png")  # Apple missing: numbered on its own, mango would become 0
    with pytest.raises(DataFormatError, match=r"\['Apple'\] of the train split .* missing") as err:
        imagefolder.index(str(tree), "data", "val")
    assert err.value.path == str(test)
    save_image(test / "Apple" / "z.png")
    save_image(test / "kiwi" / "z.png")
    with pytest.raises(DataFormatError, match="class folder not in the train split") as err:
        imagefolder.index(str(tree), "data", "val")
    assert err.value.path == str(test / "kiwi")


def test_missing_split_and_empty_class_folder_are_named(tree):
    with pytest.raises(DataFormatError) as err:
        imagefolder.index(str(tree), "elsewhere", "train")
    assert err.value.path == str(tree / "elsewhere" / "train")
    empty = tree / "data" / "train" / "kiwi"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(DataFormatError, match="no .png/.jpg/.jpeg images") as err:
        imagefolder.index(str(tree), "data", "train")
    assert err.value.path == str(empty)


def test_split_without_class_folders(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no class folders"):
        imagefolder.index(str(tmp_path), "d", "train")


def test_decode_names_a_corrupt_image_or_skips_it(tree):
    good = tree / "data" / "train" / "zebra" / "b.png"
    corrupt = tree / "data" / "train" / "zebra" / "broken.png"
    corrupt.write_bytes(good.read_bytes()[:40])  # a truncated PNG
    paths = np.array([str(good), str(corrupt)], dtype=object)
    with pytest.raises(DataFormatError) as err:
        imagefolder.decode_images(paths, skip_bad=False)
    assert err.value.path == str(corrupt)
    images, keep = imagefolder.decode_images(paths, skip_bad=True)
    assert keep.tolist() == [True, False]
    assert images.dtype == object and images[0].shape == (6, 8, 3)
    assert np.array_equal(images[0][0, 0], [10, 200, 30])


def test_demo_hotdog_layout_sizes_and_determinism(tmp_path):
    folder = demo.write(tmp_path / "a", seed=3, n_train_per_class=3, n_test_per_class=2)
    assert imagefolder.find_classes(str(folder / "train")) == ["hotdog", "not-hotdog"]
    index = imagefolder.index(str(tmp_path / "a"), "hotdog", "train")
    assert index["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(imagefolder.index(str(tmp_path / "a"), "hotdog", "val")) == 4
    images, keep = imagefolder.decode_images(index["path"].to_numpy(), skip_bad=False)
    assert keep.all()
    for image in images:
        assert demo.SIZE_RANGE[0] <= image.shape[0] <= demo.SIZE_RANGE[1]
        assert demo.SIZE_RANGE[0] <= image.shape[1] <= demo.SIZE_RANGE[1]
    again = demo.write(tmp_path / "b", seed=3, n_train_per_class=3, n_test_per_class=2)
    first = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
    assert first == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((folder / p).read_bytes() == (again / p).read_bytes() for p in first)


def test_demo_source_has_ten_other_foods(tmp_path):
    demo.write_source(tmp_path, n_train_per_class=1, n_test_per_class=1)
    classes = imagefolder.find_classes(imagefolder.split_dir(str(tmp_path), "hotdog-source", "train"))
    assert classes == sorted(demo.OTHER_FOODS) and len(classes) == 10 and "hotdog" not in classes
    assert len(imagefolder.index(str(tmp_path), "hotdog-source", "val")) == 10

