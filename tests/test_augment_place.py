"""Where training batches are augmented (``data.augment_on``): in the training worker's own process (the CPU
default) or in Ray Data's tasks (the GPU default); both give the model the same arrays from the same draws."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_tasks

from cvtasks.demo import cifar as demo_cifar
from cvtasks.images import object_array
from cvtasks.tasks import get_task
from pipelines.config import load_config
from pipelines.data import augments_in_worker, build_split, task_path
from pipelines.loop import augmented_batches, locally_shuffled
from pipelines.train import run_training


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    demo_cifar.write(root, seed=0, n_train=80, n_test=40)
    return root


def _cfg(root, *overrides: str):
    return load_config("cifar10", overrides=[f"data.root={root}", *overrides])


@pytest.mark.parametrize("place, gpus, in_worker", [
    ("auto", 0.0, True), ("auto", 1.0, False), ("worker", 1.0, True), ("pipeline", 0.0, False),
])
def test_auto_augments_in_the_worker_on_cpus_and_in_the_pipeline_with_gpus(place, gpus, in_worker):
    cfg = load_config("cifar10", overrides=[f"data.augment_on={place}", f"scaling.gpus_per_worker={gpus}"])
    assert augments_in_worker(cfg) is in_worker


def test_worker_augments_with_the_tasks_own_augmentation_into_tensors(cifar_root):
    cfg = _cfg(cifar_root)
    task = get_task("cifar10")
    index = task.index("train", cfg).head(16)
    decoded = task.decode({col: index[col].to_numpy() for col in index.columns}, cfg)
    halves = [{key: value[:8] for key, value in decoded.items()}, {key: value[8:] for key, value in decoded.items()}]
    rng = np.random.default_rng(7)
    expected = [task.augment(half, True, cfg, rng) for half in halves]

    batches = list(augmented_batches(halves, task_path(task), cfg, True, np.random.default_rng(7),
                                     torch.device("cpu")))

    assert len(batches) == 2
    for pixels, want in zip(batches, expected, strict=True):
        assert sorted(pixels) == sorted(task.tensor_keys)
        assert pixels["image"].dtype == torch.uint8 and pixels["image"].shape[-1] == 3  # NHWC pixels cross over
        tensors = task.inputs_from_pixels(pixels, cfg)  # what the worker feeds the model: the task's numpy augment
        for key in task.tensor_keys:
            assert isinstance(tensors[key], torch.Tensor)
            np.testing.assert_array_equal(tensors[key].numpy(), want[key])


def _image_batches(shapes: list[list[tuple[int, int]]]) -> list[dict[str, np.ndarray]]:
    """Batches of rows numbered 0.. in order, one per list of row shapes: ``id``, and ``image`` arrays filled with
    the row's id, as Ray Data gives a variable-shaped column (dense where a batch's rows share a shape, an object
    array of rows otherwise)."""
    batches, first = [], 0
    for batch_shapes in shapes:
        ids = np.arange(first, first + len(batch_shapes))
        rows = [np.full((*shape, 3), i % 256, np.uint8) for i, shape in zip(ids, batch_shapes, strict=True)]
        image = np.stack(rows) if len(set(batch_shapes)) == 1 else object_array(rows)
        batches.append({"id": ids, "image": image})
        first += len(rows)
    return batches


def test_local_shuffle_gives_every_row_once_in_full_batches_mixing_input_batches():
    dense, ragged = [(4, 6)] * 8, [(4, 6), (5, 3)] * 4
    batches = _image_batches([dense, ragged, dense, [(2, 2)] * 8, [(4, 6)] * 5])
    out = list(locally_shuffled(iter(batches), batch_size=8, buffer_rows=16, rng=np.random.default_rng(0)))
    ids = np.concatenate([batch["id"] for batch in out])
    assert sorted(ids.tolist()) == list(range(37))
    assert [len(batch["id"]) for batch in out] == [8, 8, 8, 8, 5]
    assert ids.tolist() != list(range(37)) and any(len({i // 8 for i in batch["id"]}) > 1 for batch in out)
    for batch in out:  # each row's image travelled with its id
        assert all(int(image[0, 0, 0]) == i % 256 for i, image in zip(batch["id"], batch["image"], strict=True))
    again = list(locally_shuffled(iter(batches), batch_size=8, buffer_rows=16, rng=np.random.default_rng(0)))
    assert all(np.array_equal(a["id"], b["id"]) for a, b in zip(out, again, strict=True))  # the rng decides


def test_local_shuffle_moves_ragged_images_as_references():
    batches = _image_batches([[(3, 3), (3, 5)] * 2, [(2, 2), (3, 5)] * 2, [(4, 4), (1, 1)] * 2])
    held = {id(image) for batch in batches for image in batch["image"]}
    out = list(locally_shuffled(iter(batches), batch_size=4, buffer_rows=4, rng=np.random.default_rng(1)))
    assert {id(image) for batch in out for image in batch["image"]} == held


@pytest.mark.slow
@pytest.mark.parametrize("place", ["worker", "pipeline"])
def test_the_pipeline_hands_workers_decoded_or_augmented_rows(ray_cluster, cifar_root, place):
    cfg = _cfg(cifar_root, f"data.augment_on={place}")
    split = build_split(get_task("cifar10"), cfg, "train", train=True)
    batch = next(iter(split.dataset.iter_batches(batch_size=8, batch_format="numpy")))
    # Either way uint8 HWC pixels cross the object store: CIFAR's decoded rows as cached (worker), or augmented ones
    # (pipeline); the worker makes them model inputs.
    assert (batch["image"].dtype, batch["image"].shape[1:]) == (np.uint8, (32, 32, 3))
    assert ("augment_batch" in split.dataset.stats()) == (place == "pipeline")


def _tasks_named(name: str, since_ms: int) -> list:
    return [task for task in list_tasks(filters=[("name", "=", name)], limit=10_000, detail=True,
                                        raise_on_missing_output=False) if (task.start_time_ms or 0) >= since_ms]


@pytest.mark.slow
def test_a_run_that_augments_in_the_pipeline_trains_in_warmed_workers(ray_cluster, mlflow_server, cifar_root,
                                                                      tmp_path):
    """The default runs of the other tests augment in the worker; this one trains through Ray Data's augment tasks,
    which run in Ray Train's environment: the run's one worker warmed processes of that environment as it started,
    so an augment task's process had imported the task before it (Ray's task events, from its state API)."""
    started_ms = int(time.time() * 1000)
    cfg = _cfg(cifar_root, "data.augment_on=pipeline", "train.epochs=2", "data.batch_size=16", "model.width=8")
    outcome = run_training(cfg, mlflow_server.url, storage=str(tmp_path / "rr"))
    run = MlflowClient(mlflow_server.url).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"

    deadline = time.monotonic() + 30  # task events reach the state API a second or so after the tasks
    while not (augments := _tasks_named("MapBatches(augment_batch)", started_ms)) and time.monotonic() < deadline:
        time.sleep(1)
    warmed = {(task.worker_pid, task.node_id): task.end_time_ms for task in _tasks_named("_import_task", 0)
              if task.end_time_ms}
    assert augments
    assert any(warmed.get((task.worker_pid, task.node_id), task.start_time_ms + 1) <= task.start_time_ms
               for task in augments)
    assert run.data.params["data.augment_on"] == "pipeline"
    history = MlflowClient(mlflow_server.url).get_metric_history(outcome.run_id, "train_loss")
    assert len(history) == 2 and all(np.isfinite(m.value) for m in history)


@pytest.mark.slow
def test_a_streamed_training_split_shuffles_its_blocks_before_decoding_and_gives_every_row_once_an_epoch(
        ray_cluster, tmp_path):
    """Shuffling the decoded blocks would wait for the whole decoded split and hold it in the object store (spilled
    on a small store): a streamed split shuffles its index blocks, then decodes as it streams."""
    demo_cifar.write(tmp_path, seed=1, n_train=640, n_test=16)
    cfg = _cfg(tmp_path, "data.cache=stream", "data.augment_on=worker")
    task = get_task("cifar10")
    split = build_split(task, cfg, "train", train=True)
    index = task.index("train", cfg)
    decoded = task.decode({col: index[col].to_numpy() for col in index.columns}, cfg)
    everything = Counter(image.tobytes() for image in decoded["image"])

    epochs = [[image.tobytes() for batch in split.dataset.iter_batches(batch_size=64, batch_format="numpy")
               for image in batch["image"]] for _ in range(2)]

    assert not split.cached
    assert all(Counter(epoch) == everything for epoch in epochs)
    assert epochs[0] != epochs[1]  # each epoch draws a new block order
    stats = split.dataset.stats()
    assert stats.index("RandomizeBlockOrder") < stats.index("_decode"), stats
