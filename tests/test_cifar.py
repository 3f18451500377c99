"""CIFAR-10 format: the safe unpickler, the real pickle structure written by the demo, validation errors."""

import os
import pickle

import numpy as np
import pytest

from cvtasks.demo import cifar as demo
from cvtasks.errors import DataFormatError
from cvtasks.formats import cifar

N_TRAIN, N_TEST = 50, 20


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("cifar")
    demo.write(path, seed=0, n_train=N_TRAIN, n_test=N_TEST)
    return path


def batch_path(root, name):
    return root / cifar.DATASET_DIR / name


def test_demo_files_have_the_real_structure(root):
    with open(batch_path(root, "data_batch_1"), "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # how the dataset's own page says to read it
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"batch_label"] == b"training batch 1 of 5"
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (N_TRAIN // 5, 3072)
    assert isinstance(batch[b"labels"], list) and all(type(v) is int for v in batch[b"labels"])
    assert len(batch[b"labels"]) == len(batch[b"filenames"]) == N_TRAIN // 5
    assert all(isinstance(name, bytes) and name.endswith(b".png") for name in batch[b"filenames"])
    with open(batch_path(root, "batches.meta"), "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"label_names"] == [name.encode() for name in demo.CLASS_NAMES]
    assert meta[b"num_vis"] == 3072
    with open(batch_path(root, "test_batch"), "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"data"].shape == (N_TEST, 3072)


def test_demo_pickles_like_python2(root):
    raw = batch_path(root, "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw  # numpy 1.x name, as in the real files
    assert b"_codecs" not in raw  # bytes as py2 str opcodes, not Python 3's _codecs.encode calls
    assert b"U\x0bbatch_label" in raw  # SHORT_BINSTRING key


def test_demo_is_deterministic(tmp_path, root):
    demo.write(tmp_path, seed=0, n_train=N_TRAIN, n_test=N_TEST)
    for name in (*cifar.TRAIN_FILES, cifar.TEST_FILE, cifar.META_FILE):
        assert batch_path(tmp_path, name).read_bytes() == batch_path(root, name).read_bytes()


def test_index_and_decode_follow_the_plane_layout(root):
    index = cifar.index(str(root), "train")
    assert len(index) == N_TRAIN and list(index.columns) == ["pixels", "label", "path", "row"]
    assert index["label"].between(0, 9).all()
    assert len(cifar.index(str(root), "val")) == N_TEST
    images = cifar.decode_pixels(index["pixels"].to_numpy(), index["path"].to_numpy(), index["row"].to_numpy())
    assert images.shape == (N_TRAIN, 32, 32, 3) and images.dtype == np.uint8
    row = np.frombuffer(index["pixels"][7], dtype=np.uint8)
    # channel c of pixel (y, x) sits at c * 1024 + y * 32 + x
    assert images[7, 5, 9, 0] == row[5 * 32 + 9]
    assert images[7, 5, 9, 1] == row[1024 + 5 * 32 + 9]
    assert images[7, 31, 0, 2] == row[2048 + 31 * 32]
    assert cifar.read_label_names(str(root)) == list(demo.CLASS_NAMES)


def test_loads_numpy2_module_name_and_newer_protocols(tmp_path):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [3, 1]}, protocol=4)  # numpy._core.multiarray._reconstruct
    loaded = cifar.safe_load(raw, "x")
    assert np.array_equal(loaded[b"data"], data) and loaded[b"labels"] == [3, 1]


class Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_safe_unpickler_rejects_code_and_names_file_and_global(tmp_path, root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad_root = tmp_path / "bad"
    (bad_root / cifar.DATASET_DIR).mkdir(parents=True)
    for name in (cifar.META_FILE, *cifar.TRAIN_FILES):
        (bad_root / cifar.DATASET_DIR / name).write_bytes(batch_path(root, name).read_bytes())
    target = bad_root / cifar.DATASET_DIR / "data_batch_2"
    demo.dump_py2({b"data": Exploit(), b"labels": []}, target)  # otherwise just like the real files
    with pytest.raises(DataFormatError) as err:
        cifar.index(str(bad_root), "train")
    assert err.value.path == str(target)
    assert f"forbidden global {os.system.__module__}.system" in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_python3_protocol2_bytes_need_codecs_and_are_refused():
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(...): not what the real (py2) files contain.
    with pytest.raises(DataFormatError, match=r"forbidden global _codecs\.encode"):
        cifar.safe_load(pickle.dumps({b"batch_label": b"x"}, protocol=2), "some_batch")


def test_truncated_batch_names_the_file(tmp_path, root):
    path = tmp_path / "data_batch_3"
    raw = batch_path(root, "data_batch_3").read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="truncated") as err:
        cifar.read_batch(str(path), num_classes=10)
    assert err.value.path == str(path)


def test_invalid_batches_are_rejected(tmp_path):
    path = tmp_path / "batch"

    def write(obj):
        path.write_bytes(pickle.dumps(obj, protocol=4))

    write({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataFormatError, match=r"label 10 outside \[0, 10\)") as err:
        cifar.read_batch(str(path), num_classes=10)
    assert err.value.row == 1
    write({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataFormatError, match=r"shape \(N, 3072\)"):
        cifar.read_batch(str(path), num_classes=10)
    write({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataFormatError, match="2 images but"):
        cifar.read_batch(str(path), num_classes=10)
    write({b"labels": [0]})
    with pytest.raises(DataFormatError, match="missing key b'data'"):
        cifar.read_batch(str(path), num_classes=10)
    write([1, 2])
    with pytest.raises(DataFormatError, match="expected a pickled dict"):
        cifar.read_batch(str(path), num_classes=10)


def test_missing_meta_and_unknown_split(tmp_path):
    (tmp_path / cifar.DATASET_DIR).mkdir()
    with pytest.raises(DataFormatError, match="batches.meta"):
        cifar.index(str(tmp_path), "train")
    with pytest.raises(ValueError, match="Unknown split"):
        cifar.index(str(tmp_path), "test")


def test_decode_rejects_a_short_row():
    rows = np.array([bytes(3072), bytes(3000)], dtype=object)
    with pytest.raises(DataFormatError, match="3000 bytes, expected 3072") as err:
        cifar.decode_pixels(rows, np.array(["b1", "b2"]), np.array([4, 9]))
    assert err.value.path == "b2" and err.value.row == 9
