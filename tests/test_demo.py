"""The demo's plumbing without its training: the step configs, and the demo datasets written in parallel."""

import filecmp
from pathlib import Path

from pipelines.config import load_config
from pipelines.data_commands import DEMO_MARKER, make_demo
from pipelines.demo import _resolve, demo_steps


def test_every_demo_step_is_a_valid_config_that_names_only_earlier_runs():
    runs: dict[str, str] = {}
    steps = demo_steps()
    assert [s.kind for s in steps][-1] == "tune"  # sweeps run after every task's own runs
    for step in steps:
        overrides = _resolve(step.overrides, runs, cpus=2)
        assert not any("{" in item for item in overrides), f"{step.name} names a later or unknown step"
        cfg = load_config(step.task, overrides=["data.root=/data", *overrides])
        assert cfg.task == step.task
        runs[step.name] = f"run-of-{step.name}"
    assert runs.keys() >= {"cifar10", "hotdog-finetuned", "hotdog-scratch", "banana", "voc", "style", "sweep-hotdog"}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_parallel_demo_writing_matches_one_process_and_is_reused(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    make_demo(one, seed=3, only=["cifar10", "hotdog"], processes=1)
    written = make_demo(two, seed=3, only=["cifar10", "hotdog"], processes=2)
    assert _files(one) == _files(two) and len(_files(two)) > 100
    _, mismatch, errors = filecmp.cmpfiles(one, two, _files(one), shallow=False)
    assert mismatch == errors == []
    assert all((folder / DEMO_MARKER).read_text() == "3" for folder in written.values())

    stamps = {p: p.stat().st_mtime_ns for p in (two / "hotdog").rglob("*.png")}
    make_demo(two, seed=3, only=["hotdog"], processes=2)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
