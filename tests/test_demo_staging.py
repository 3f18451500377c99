"""Demo datasets are swapped in only once complete: a writer that crashes leaves no folder a later run trusts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cvtasks.tasks import task_class
from pipelines.data_commands import DEMO_MARKER, make_demo

FOLDER = "fake-dataset"
FILES = 3


class WriterCrash(RuntimeError):
    pass


def write_ok(root: Path, seed: int = 0) -> Path:
    """A stand-in demo writer: ``FILES`` files under ``root/FOLDER`` holding the seed."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        (folder / f"{i}.txt").write_text(str(seed))
    return folder


def write_then_crash(root: Path, seed: int = 0) -> Path:
    """Writes the first file of a new seed, then dies, as a killed or failing writer would."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "0.txt").write_text(str(seed))
    raise WriterCrash("writer died midway")


@pytest.fixture
def fake_writer(monkeypatch):
    """Points the "cifar10" demo dataset at this module's writers; returns a function choosing which one."""
    cifar = task_class("cifar10")

    def use(function: str) -> None:
        dataset = dataclasses.replace(cifar.datasets[0], demo_writer=f"{__name__}:{function}", folder=FOLDER)
        monkeypatch.setattr(cifar, "datasets", (dataset,))

    return use


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_crash_while_rewriting_keeps_the_old_complete_copy(tmp_path, fake_writer):
    fake_writer("write_ok")
    make_demo(tmp_path, seed=1, only=["cifar10"], processes=1)
    before = contents(tmp_path / FOLDER)
    assert before[DEMO_MARKER] == "1" and len(before) == FILES + 1

    fake_writer("write_then_crash")
    with pytest.raises(WriterCrash):
        make_demo(tmp_path, seed=2, only=["cifar10"], processes=1)
    assert contents(tmp_path / FOLDER) == before  # seed 1, whole: no file of seed 2 under seed 1's marker

    fake_writer("write_ok")
    make_demo(tmp_path, seed=2, only=["cifar10"], processes=1)
    after = contents(tmp_path / FOLDER)
    assert after == {DEMO_MARKER: "2", **{f"{i}.txt": "2" for i in range(FILES)}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER]  # staging and old copies are gone


def test_a_crash_on_the_first_write_leaves_no_dataset_folder(tmp_path, fake_writer):
    fake_writer("write_then_crash")
    with pytest.raises(WriterCrash):
        make_demo(tmp_path, seed=0, only=["cifar10"], processes=1)
    assert not (tmp_path / FOLDER).exists()
    fake_writer("write_ok")
    make_demo(tmp_path, seed=0, only=["cifar10"], processes=1)  # the leftover staging folder is cleared
    assert contents(tmp_path / FOLDER)[DEMO_MARKER] == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER]
