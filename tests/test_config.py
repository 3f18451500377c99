import dataclasses

import pytest

from cvtasks.settings import SHARED
from cvtasks.tasks import task_names
from pipelines.config import ConfigError, flatten, load_config


def test_every_task_config_loads_and_names_its_task():
    tasks = task_names()
    assert {"cifar10", "hotdog", "banana", "voc", "style"} <= set(tasks)
    for task in tasks:
        cfg = load_config(task)
        assert cfg.task == task
        for section, typed in SHARED.items():
            assert isinstance(getattr(cfg, section), typed), (task, section)  # a task may extend a shared section


def test_overrides_are_typed_and_checked():
    cfg = load_config("cifar10", overrides=["optim.lr=0.5", "train.epochs=3", "optim.weight_decay=1"])
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 3
    assert isinstance(cfg.optim.weight_decay, float)  # an int may stand for a float
    with pytest.raises(ConfigError, match="optim.lrr.*did you mean lr"):
        load_config("cifar10", overrides=["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.epochs must be int"):
        load_config("cifar10", overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("cifar10", overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="unknown task"):
        load_config("nope")


def test_config_file_merges_partially(tmp_path):
    partial = tmp_path / "mine.yaml"
    partial.write_text("optim:\n  lr: 0.25\ntrain:\n  epochs: 2\n")
    cfg = load_config("cifar10", partial)
    assert cfg.optim.lr == 0.25 and cfg.train.epochs == 2
    assert cfg.optim.name == load_config("cifar10").optim.name
    partial.write_text("optim:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=f"{partial}.*optim.bogus"):
        load_config("cifar10", partial)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": [1, 2], "d": "x"}


def test_worker_cpus_leave_one_cpu_for_ray_data():
    from pipelines.train import worker_cpus

    assert worker_cpus(1.0, 2, cluster_cpus=4.0) == 1.0
    assert worker_cpus(1.0, 2, cluster_cpus=2.0) == 0.5
    assert worker_cpus(1.0, 1, cluster_cpus=1.0) == 0.5
    assert worker_cpus(2.0, 4, cluster_cpus=64.0) == 2.0
    # A sweep trial's own 0.01 CPU counts: a 1-CPU worker beside it would leave Ray Data 0.99 CPU, and its
    # augment tasks (1 CPU each) would never run (the demo's sweep stalled on its first epoch).
    assert worker_cpus(1.0, 1, cluster_cpus=2.0) == 1.0
    assert worker_cpus(1.0, 1, cluster_cpus=2.0, held_cpus=0.01) == pytest.approx(0.99)


def test_sweep_concurrency_fits_the_trials_train_workers():
    from pipelines.tune import fitting_concurrency

    scaling = load_config("cifar10").scaling
    one_worker = dataclasses.replace(scaling, workers=1, cpus_per_worker=1.0)
    assert fitting_concurrency(2, one_worker, cluster_cpus=2.0) == 1  # 2 trials x 1 CPU + Ray Data > 2 CPUs
    assert fitting_concurrency(4, one_worker, cluster_cpus=16.0) == 4
    assert fitting_concurrency(8, dataclasses.replace(one_worker, workers=2), cluster_cpus=16.0) == 7
    assert fitting_concurrency(3, None, cluster_cpus=2.0) == 3  # trials that hold their own resources: Tune queues
