"""``raycv data check TASK --root DIR``: counts per split and class, and every bad file named, on demo data."""

from __future__ import annotations

import pytest
from PIL import Image

from cvtasks.demo import cifar as cifar_demo
from cvtasks.demo import hotdog as hotdog_demo
from cvtasks.demo import voc as voc_demo
from pipelines import cli


def run_check(capsys, task: str, root) -> tuple[int, str]:
    code = cli.main(["data", "check", task, "--root", str(root)])
    return code, capsys.readouterr().out


@pytest.fixture
def hotdog_root(tmp_path):
    hotdog_demo.write(tmp_path, seed=0, n_train_per_class=4, n_test_per_class=4)
    return tmp_path


def test_clean_hotdog_reports_counts_per_class_and_ok(capsys, hotdog_root):
    code, out = run_check(capsys, "hotdog", hotdog_root)
    assert code == 0
    assert "train: 8 samples | per class: 0: 4, 1: 4" in out
    assert "val: 8 samples | per class: 0: 4, 1: 4" in out
    assert out.strip().endswith("ok")


def test_corrupt_and_truncated_pngs_are_each_named(capsys, hotdog_root):
    train_dog = hotdog_root / "hotdog" / "train" / "hotdog"
    corrupt, truncated = sorted(train_dog.glob("*.png"))[:2]
    corrupt.write_bytes(b"this is not a png")
    truncated.write_bytes(truncated.read_bytes()[:200])

    code, out = run_check(capsys, "hotdog", hotdog_root)

    assert code == 1
    bad = [line for line in out.splitlines() if line.strip().startswith("BAD")]
    assert len(bad) == 2
    assert any(str(corrupt) in line and "not a readable image" in line for line in bad)
    assert any(str(truncated) in line for line in bad)
    assert "2 problem(s) found" in out


def test_empty_class_folder_and_missing_split_are_reported(capsys, hotdog_root):
    (hotdog_root / "hotdog" / "test" / "hotdog").rename(hotdog_root / "moved")
    empty = hotdog_root / "hotdog" / "train" / "hotdog"
    for png in empty.glob("*.png"):
        png.unlink()
    code, out = run_check(capsys, "hotdog", hotdog_root)
    assert code == 1
    assert f"train: ERROR {empty}" in out


def test_cifar_counts_and_a_truncated_batch(capsys, tmp_path):
    folder = cifar_demo.write(tmp_path, seed=0, n_train=20, n_test=10)
    code, out = run_check(capsys, "cifar10", tmp_path)
    assert code == 0 and "train: 20 samples" in out and "val: 10 samples" in out
    batch = folder / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    code, out = run_check(capsys, "cifar10", tmp_path)
    assert code == 1
    assert f"val: ERROR {batch}" in out


def test_voc_mask_of_the_wrong_size_is_named(capsys, tmp_path):
    voc_demo.write(tmp_path, seed=0, n_train=3, n_val=2, min_side=40, max_side=60)
    masks = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    mask = sorted(masks.glob("*.png"))[0]
    with Image.open(mask) as img:
        img.crop((0, 0, 10, 10)).save(mask)
    code, out = run_check(capsys, "voc", tmp_path)
    assert code == 1
    assert any(str(mask) in line for line in out.splitlines() if "BAD" in line)
