"""What Ray Train's controller and Ray Data's coordinators unpickle stays light: the hand-off module and the data
pipeline's map functions import neither torch, torchvision nor MLflow (each of those processes would otherwise
spend seconds of CPU importing them before the first step)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd

from cvtasks.tasks import get_task
from pipelines.data import index_digest, task_at, task_path
from pipelines.local_ray import MIN_WORKERS_KEPT, worker_pool_config
from pipelines.progress import steps_per_epoch

HEAVY = ("torch", "torchvision", "mlflow", "matplotlib", "cvtasks.tasks.base")


def test_handoff_and_data_modules_import_nothing_heavy():
    code = ("import sys, pipelines.handoff, pipelines.data; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"imported at module level: {loaded}"


def test_map_functions_name_the_task_by_import_path():
    task = get_task("voc")
    assert task_path(task) == "cvtasks.tasks.voc:VocTask"
    assert type(task_at(task_path(task))) is type(task)
    assert task_at(task_path(task)) is task_at(task_path(task))  # one per process


def test_index_digest_follows_the_rows_not_their_order_of_creation():
    index = pd.DataFrame({"path": ["a.png", "b.png"], "label": [0, 1]})
    assert index_digest(index) == index_digest(index.copy())
    assert index_digest(index) != index_digest(index.assign(label=[1, 0]))
    assert len(index_digest(index)) == 16
    boxes = pd.DataFrame({"path": ["a.png"], "boxes": [np.array([[0, 1.0, 2.0, 3.0, 4.0]])]})  # banana-style cells
    assert index_digest(boxes) != index_digest(boxes.assign(boxes=[np.array([[0, 1.0, 2.0, 3.0, 5.0]])]))


def test_index_digest_sees_every_byte_of_raw_and_large_cells():
    pixels = pd.DataFrame({"pixels": [bytes(3072), bytes(3072)], "label": [0, 1]})  # CIFAR-style raw rows
    changed = pixels.assign(pixels=[bytes(3072), bytes(1500) + b"\x01" + bytes(1571)])
    assert index_digest(pixels) != index_digest(changed)
    big = np.zeros((400, 5))  # pandas' CSV text prints arrays this large with "..." in the middle
    other = big.copy()
    other[200, 3] = 1.0
    assert index_digest(pd.DataFrame({"boxes": [big]})) != index_digest(pd.DataFrame({"boxes": [other]}))
    # a cell's type and its split between cells count, not only its characters
    assert index_digest(pd.DataFrame({"a": ["1"]})) != index_digest(pd.DataFrame({"a": [1]}))
    assert index_digest(pd.DataFrame({"a": [[1, 2], [3]]})) != index_digest(pd.DataFrame({"a": [[1], [2, 3]]}))


def test_steps_per_epoch_is_each_workers_share_rounded_up():
    assert steps_per_epoch(1000, 2, 64) == 8
    assert steps_per_epoch(128, 1, 64) == 2
    assert steps_per_epoch(0, 1, 64) == 1


def test_small_nodes_keep_a_runs_idle_workers_big_ones_keep_rays_default():
    assert worker_pool_config(2)["num_workers_soft_limit"] == MIN_WORKERS_KEPT
    assert worker_pool_config(64)["num_workers_soft_limit"] == 64
