"""The Ray Train worker loop: generic over tasks, DDP on CPUs or GPUs, checkpoint + report every epoch, in named
steps (start the worker, train an epoch, validate, checkpoint and report, log) over :mod:`pipelines.steps`.

Rank 0 logs each epoch to MLflow right after ``ray.train.report`` has persisted the epoch's checkpoint. A
restarted attempt (worker failure or ``--resume``) first replays the checkpoint's metric history into MLflow for
epochs MLflow lacks, so no epoch is lost; an epoch that a lost attempt logged after a checkpoint the restart does
not see (a Tune trial restores the checkpoint Tune last recorded) keeps its first values, so none is logged twice.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data import DataIterator, Dataset
from torch import nn

from cvtasks.errors import DataFormatError
from cvtasks.images import object_array
from cvtasks.models.weights import load_tensor_file
from cvtasks.tasks.base import Config, Task, TensorBatch
from pipelines import logs
from pipelines.data import augment_batch, augments_in_worker, row_count, task_at
from pipelines.failures import fail_fast
from pipelines.progress import EpochProgress, steps_per_epoch
from pipelines.run_logging import FIRST_STEP_TAG, RunLogger, system_metrics
from pipelines.steps import (
    PassSums,
    channels_last_model,
    epoch_metrics,
    evaluate,
    lr_factor,
    make_optimizer,
    set_learning_rate,
    train_one_epoch,
)
from pipelines.weights import build_model

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history")
#: Training batches are drawn from a buffer of this many batches' rows, on top of the pipeline's shuffled blocks.
SHUFFLE_BUFFER_BATCHES = 2


def _save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                     history: list[dict[str, float]]) -> ray.train.Checkpoint:
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history},
        Path(directory) / CHECKPOINT_FILE,
    )
    return ray.train.Checkpoint.from_directory(directory)


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The state a raycv checkpoint directory holds (see ``_save_checkpoint``), read with ``weights_only=True``:
    a ``state.pt`` that needs more (a pickle that would run code) raises ``DataFormatError`` naming it."""
    path = str(Path(directory) / CHECKPOINT_FILE)
    state = load_tensor_file(path, "raycv checkpoint", "raycv checkpoints hold tensors, numbers, strings, dicts "
                                                       "and lists only")
    if not (isinstance(state, dict) and all(key in state for key in CHECKPOINT_KEYS)):
        raise DataFormatError(path, f"not a raycv checkpoint: expected a dict with {', '.join(CHECKPOINT_KEYS)}")
    return state


def _worker_nodes() -> list[str]:
    """The Ray node id of every worker, by rank (all ranks must call this together)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _to_numpy(batch: TensorBatch) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in batch.items()}


@dataclass
class WorkerRun:
    """One worker's state for a run: what every step below needs."""

    config: dict[str, Any]  # the trainer's train_loop_config
    cfg: Config
    task: Task
    model: nn.Module  # as trained (DDP-wrapped on several workers)
    raw_model: nn.Module  # the model itself: what checkpoints and MLflow hold
    optimizer: torch.optim.Optimizer
    logger: RunLogger
    device: torch.device
    rank: int
    world: int
    resumed: bool  # started from a checkpoint (a restarted attempt or --resume)
    start_epoch: int
    history: list[dict[str, float]]


def start_worker(config: dict[str, Any]) -> WorkerRun:
    """Seed, threads, the model (with the driver's weights), the optimiser, and the state of the last checkpoint
    when this attempt resumes; tags the run with this worker group's placement."""
    logs.configure_worker_logging(bool(config.get("verbose")))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = config["cfg"]
    task = task_at(config["task"])  # by import path: the task may be registered only in the driver's process
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    threads = cfg.scaling.torch_threads
    if threads:
        torch.set_num_threads(threads)
    log.debug("rank %d of %d on %s with %d torch threads", rank, world, device, torch.get_num_threads())
    raw_model = channels_last_model(build_model(task, cfg, config.get("weights")), cfg.train.channels_last)
    optimizer = make_optimizer(task.param_groups(raw_model, cfg), cfg.optim)
    logger = RunLogger(config["tracking_uri"], config["run_id"], active=rank == 0)
    start_epoch, history = 0, []
    tags = {"raycv.torch_threads": str(torch.get_num_threads()),  # examples/sec depend on it
            "raycv.worker_nodes": ",".join(_worker_nodes())}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        log.info("rank %d resumed after epoch %d", rank, state["epoch"])
    else:
        tags["raycv.weights"] = getattr(raw_model, "weights_description", "n/a")
    logger.tags(tags)
    logger.start(history)
    return WorkerRun(config, cfg, task, ray.train.torch.prepare_model(raw_model), raw_model, optimizer, logger,
                     device, rank, world, checkpoint is not None, start_epoch, history)


def augmented_batches(decoded: Iterable[dict[str, np.ndarray]], task: str, cfg: Config, train: bool,
                      rng: np.random.Generator, device: torch.device) -> Iterator[TensorBatch]:
    """Tensor batches of augmented pixels of ``decoded`` numpy batches, augmented by ``task`` (a
    :func:`pipelines.data.task_path`) as each one is drawn, in the caller's thread: between training steps, as a
    plain loop does. (Augmenting in Ray Data's prefetch thread instead, as a ``collate_fn``, beside the step's torch
    threads, was measured once 7% slower for CIFAR-10 on 2 cores, and the same for banana.) Arrays the augmentation
    passes through unchanged may be read-only views of the object store: those are copied, as torch wants writable
    memory.
    """
    for batch in decoded:
        out = augment_batch(batch, task, cfg, train, rng)
        yield {key: torch.from_numpy(np.require(value, requirements=["C", "W"])).to(device)
               for key, value in out.items()}


def locally_shuffled(batches: Iterable[dict[str, np.ndarray]], batch_size: int, buffer_rows: int,
                     rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows (the last one possibly short) with the input's rows shuffled in windows of
    ``buffer_rows + batch_size`` rows or more: each row once. A local shuffle, as Ray Data's buffer of
    ``buffer_rows`` makes, on numpy batches, in few operations per window.

    A variable-shaped column (VOC's decoded images and masks) moves as references to its rows: Ray Data's own
    buffer copied every image through Arrow's ``take``, which took most of a VOC epoch augmented in the training
    worker (py-spy: the loop waited for it 60% of the time).
    """
    window, pending, rows = buffer_rows + batch_size, [], 0
    for batch in batches:
        pending.append(batch)
        rows += row_count(batch)
        if rows >= window:
            shuffled, full = _shuffled(pending, rng), rows - rows % batch_size
            yield from _sliced(shuffled, full, batch_size)
            pending = [{key: column[full:] for key, column in shuffled.items()}] if full < rows else []
            rows -= full
    if rows:
        yield from _sliced(_shuffled(pending, rng), rows, batch_size)


def _sliced(batch: dict[str, np.ndarray], stop: int, size: int) -> Iterator[dict[str, np.ndarray]]:
    """The first ``stop`` rows of ``batch`` in batches of ``size`` (views)."""
    for first in range(0, stop, size):
        yield {key: column[first:min(first + size, stop)] for key, column in batch.items()}


def _shuffled(batches: list[dict[str, np.ndarray]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The rows of ``batches``, one batch, in a random order."""
    order = rng.permutation(sum(row_count(batch) for batch in batches))
    return {key: _joined([batch[key] for batch in batches])[order] for key in batches[0]}


def _joined(columns: list[np.ndarray]) -> np.ndarray:
    """The rows of several batches' column, one array: dense where every part is dense with the same row shape and
    dtype, else an object array of the rows (Ray Data gives a variable-shaped column as one dense array where a
    batch's rows happen to share a shape, and as an object array of rows otherwise)."""
    first = columns[0]
    if len(columns) == 1:
        return first
    if all(part.dtype == first.dtype and part.shape[1:] == first.shape[1:] for part in columns):
        return np.concatenate(columns)
    return object_array([row for part in columns for row in part])


def read_batches(data: Dataset | DataIterator, task: str, cfg: Config, train: bool,
                 rng: np.random.Generator, device: torch.device, batch_size: int,
                 shuffle_rows: int | None = None) -> Iterator[TensorBatch]:
    """The model's tensor batches of a split (a Dataset, or a worker's shard of one) for ``task`` (its import path):
    augmented by the pipeline, or here, batch by batch, with ``rng`` (:func:`pipelines.data.augments_in_worker`);
    either way the pixels become the model's input on ``device`` (``Task.inputs_from_pixels``). ``shuffle_rows``:
    the local shuffle buffer's rows: Ray Data's buffer, or where the worker augments a task's decoded images of
    varying sizes (``Task.ragged_decode``), :func:`locally_shuffled` with ``rng``, which moves them as references
    (Ray Data's runs in its prefetch thread, beside this one, and is the cheaper one for fixed-size rows: CIFAR-10's
    50,000 read in 0.43 s an epoch against 0.53 s)."""
    found = task_at(task)
    if augments_in_worker(cfg):
        shuffles_here = bool(shuffle_rows) and found.ragged_decode
        decoded: Iterable[dict[str, np.ndarray]] = data.iter_batches(
            batch_size=batch_size, batch_format="numpy",
            local_shuffle_buffer_size=None if shuffles_here else shuffle_rows)
        if shuffles_here:
            decoded = locally_shuffled(decoded, batch_size, shuffle_rows, rng)
        pixels: Iterable[TensorBatch] = augmented_batches(decoded, task, cfg, train, rng, device)
    else:
        pixels = data.iter_torch_batches(batch_size=batch_size, device=device, local_shuffle_buffer_size=shuffle_rows)
    for batch in pixels:
        yield found.inputs_from_pixels(batch, cfg)


def shard_batches(run: WorkerRun, split: str, batch_size: int, epoch: int,
                  shuffle_rows: int | None = None) -> Iterable[TensorBatch]:
    """This worker's tensor batches of ``split`` (:func:`read_batches`), with the worker's generator for the pass
    (one per rank and epoch, so a restarted epoch repeats its draws)."""
    train = split == "train"
    rng = np.random.default_rng([run.cfg.train.seed, run.rank, epoch, int(train)])
    return read_batches(ray.train.get_dataset_shard(split), run.config["task"], run.cfg, train, rng, run.device,
                        batch_size, shuffle_rows)


def train_epoch(run: WorkerRun, epoch: int) -> PassSums:
    """This worker's training pass over its shard of the train split, with rank 0's progress bar; the first step
    of the attempt is kept for the augmented-inputs picture (and, on a fresh run, marks where start-up ended),
    which rank 0 draws and logs after the pass, outside the epoch's examples/sec."""
    cfg, epochs = run.cfg, run.cfg.train.epochs
    batch_size = cfg.data.batch_size
    first: list[tuple[float, TensorBatch]] = []

    batches = shard_batches(run, "train", batch_size, epoch, SHUFFLE_BUFFER_BATCHES * batch_size)
    bar = EpochProgress(epoch, epochs, steps_per_epoch(run.config["train_rows"], run.world, batch_size),
                        run.config.get("progress", "bar")) if run.rank == 0 else None
    try:
        sums = train_one_epoch(
            run.task, run.model, run.optimizer, batches, cfg, run.device,
            on_first_batch=(lambda batch: first.append((time.time(), {k: v.clone() for k, v in batch.items()})))
            if epoch == run.start_epoch and run.rank == 0 else None,
            on_step=bar.step if bar else None)
    finally:
        if bar:
            bar.close()
    for first_step_at, batch in first:
        if not run.resumed:
            run.logger.mark({FIRST_STEP_TAG: f"{first_step_at:.3f}"})
        run.logger.image(run.task.render_inputs(_to_numpy(batch), cfg), "plots/train_augmented.png")
    return sums


def validate(run: WorkerRun, epoch: int, keep: list[TensorBatch] | None = None) -> PassSums:
    """This worker's evaluation pass over its shard of the val split; ``keep`` receives its first batch."""
    batches = shard_batches(run, "val", run.cfg.data.eval_batch_size, epoch)
    return evaluate(run.task, run.model, batches, run.cfg, run.device,
                    on_first_batch=keep.append if keep is not None else None)


def checkpoint_and_report(run: WorkerRun, epoch: int, metrics: dict[str, float]) -> None:
    """Report the epoch to Ray Train with rank 0's checkpoint (model, optimiser, epoch, metric history)."""
    with tempfile.TemporaryDirectory() as directory:
        ckpt = _save_checkpoint(directory, run.raw_model, run.optimizer, epoch, run.history) if run.rank == 0 \
            else None
        ray.train.report(metrics, checkpoint=ckpt)


@fail_fast  # a deterministic error (bad data, config or weights) ends the run instead of being retried
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: {"cfg": task config, "task": its ``module:Class`` (``task_path``),
    "tracking_uri": str, "run_id": str, "weights": the driver's :class:`pipelines.handoff.ResolvedWeights` or
    None, "train_rows": rows of the train split, "verbose": bool, "progress": console style}."""
    run = start_worker(config)
    cfg, epochs = run.cfg, run.cfg.train.epochs
    fail_at = cfg.train.inject_failure_at_epoch
    last_val_batch: list[TensorBatch] = []
    val_sums: dict[str, torch.Tensor] = {}
    with system_metrics(config["tracking_uri"], config["run_id"], run.rank, run.world, resumed=run.resumed):
        for epoch in range(run.start_epoch, epochs):
            lr = cfg.optim.lr * lr_factor(cfg.optim.schedule, epoch, epochs)
            set_learning_rate(run.optimizer, lr)
            train = train_epoch(run, epoch)
            val = validate(run, epoch, keep=last_val_batch if epoch == epochs - 1 else None)
            metrics, val_sums = epoch_metrics(run.task, cfg, train, val, run.world, run.device)
            metrics.update(lr=lr, epoch=epoch)
            run.history.append(metrics)
            checkpoint_and_report(run, epoch, metrics)
            if epoch == fail_at and not run.resumed:
                raise RuntimeError(f"injected failure after epoch {epoch} (train.inject_failure_at_epoch)")
            run.logger.epoch(epoch, metrics)
            if run.rank == 0:
                log.info("epoch %d/%d %s", epoch + 1, epochs,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        run.logger.finish(run.task, run.raw_model, cfg, run.history, next(iter(last_val_batch), None), val_sums)
