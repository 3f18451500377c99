"""The Ray Train worker loop: generic over tasks, DDP on CPUs or GPUs, checkpoint + report every epoch.

Rank 0 logs each epoch to MLflow right after ``ray.train.report`` has persisted the epoch's checkpoint. A
restarted attempt (worker failure or ``--resume``) first replays the checkpoint's metric history into MLflow for
epochs MLflow lacks, so no epoch is lost; an epoch that a lost attempt logged after a checkpoint the restart does
not see (a Tune trial restores the checkpoint Tune last recorded) keeps its first values, so none is logged twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from cvtasks.errors import DataFormatError
from cvtasks.models.weights import load_tensor_file
from cvtasks.tasks.base import Config, Task, TensorBatch
from pipelines import logs
from pipelines.data import task_at
from pipelines.failures import fail_fast
from pipelines.progress import EpochProgress, steps_per_epoch
from pipelines.run_logging import FIRST_STEP_TAG, RunLogger, system_metrics
from pipelines.weights import build_model

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history")
#: Training batches are drawn from a buffer of this many batches' rows, on top of the pipeline's shuffled blocks.
SHUFFLE_BUFFER_BATCHES = 2


def make_optimizer(groups: list[dict[str, Any]], optim: Config) -> torch.optim.Optimizer:
    """Adam or SGD over parameter groups whose ``lr_mult`` scales the base learning rate."""
    lr = float(optim["lr"])
    param_groups = [{"params": g["params"], "lr_mult": float(g.get("lr_mult", 1.0))} for g in groups]
    name = optim["name"]
    if name == "adam":
        optimizer = torch.optim.Adam(param_groups, lr=lr, weight_decay=float(optim["weight_decay"]))
    elif name == "sgd":
        optimizer = torch.optim.SGD(
            param_groups, lr=lr, momentum=float(optim["momentum"]), weight_decay=float(optim["weight_decay"])
        )
    else:
        raise ValueError(f'Unknown optimizer "{name}": use adam or sgd')
    set_learning_rate(optimizer, lr)
    return optimizer


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Share of the base learning rate used in ``epoch`` (0-based) of ``epochs``.

    ``constant`` keeps it (d2l); ``cosine`` lowers it each epoch along half a cosine, from 1 in the first epoch
    towards 0, so that a short run's last epoch, the one reported, ends on small steps instead of a noisy jump.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f'Unknown optim.schedule "{schedule}": use constant or cosine')


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group at ``lr`` times its ``lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on GPUs when ``train.amp`` is on (no loss scaling needed); a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_reduce(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Sum each statistic over all workers (keys sorted so every rank reduces in the same order)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in sums.items()}
    out = {}
    for key in sorted(sums):
        value = sums[key].detach().to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(value)
        out[key] = value.cpu()
    return out


def _add(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for key, value in new.items():
        value = value.detach().to(torch.float64)
        acc[key] = acc[key] + value if key in acc else value


def _loss_sums(loss: torch.Tensor, parts: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    sums = {"loss_sum": loss.detach() * n, "loss_count": torch.tensor(float(n), device=loss.device)}
    sums.update({f"loss_{k}_sum": v.detach() * n for k, v in parts.items()})
    return sums


def _loss_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    count = float(sums.pop("loss_count"))
    return {k[: -len("_sum")]: float(v) / max(count, 1.0) for k, v in list(sums.items()) if k.startswith("loss")}


def run_epoch(
    task: Task, model: nn.Module, batches: Any, cfg: Config, device: torch.device, *,
    optimizer: torch.optim.Optimizer | None = None, on_first_batch: Any = None, on_step: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """One pass over ``batches``: trains when ``optimizer`` is given, else evaluates. ``on_first_batch(batch)`` sees
    the first batch, ``on_step(examples, loss)`` follows every step.

    Returns (loss sums, task metric sums, number of examples), all local to this worker.
    """
    train = optimizer is not None
    model.train(train)
    loss_acc: dict[str, torch.Tensor] = {}
    metric_acc: dict[str, torch.Tensor] = {}
    seen = 0
    amp = bool(cfg["train"]["amp"])
    with torch.set_grad_enabled(train):
        for step, batch in enumerate(batches):
            if step == 0 and on_first_batch is not None:
                on_first_batch(batch)
            n = int(batch[task.tensor_keys[0]].shape[0])
            with _autocast(device, amp):
                out = task.forward(model, batch)
                loss, parts = task.loss(out, batch, cfg)
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            _add(loss_acc, _loss_sums(loss, parts, n))
            if not train or task.train_metrics:
                with torch.no_grad():
                    _add(metric_acc, task.metric_sums(out, batch, cfg))
            seen += n
            if on_step is not None:
                on_step(n, loss.detach())
    return loss_acc, metric_acc, seen


def _epoch_metrics(
    task: Task, cfg: Config, prefix: str, loss_sums: dict[str, torch.Tensor], metric_sums: dict[str, torch.Tensor]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    metrics = {f"{prefix}{k}": v for k, v in _loss_metrics(dict(loss_sums)).items()}
    if metric_sums:
        metrics.update({f"{prefix}{k}": float(v) for k, v in task.summarize(metric_sums, cfg).items()})
    return metrics, metric_sums


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


@fail_fast  # a deterministic error (bad data, config or weights) ends the run instead of being retried
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: {"cfg": task config, "task": its ``module:Class`` (``task_path``),
    "tracking_uri": str, "run_id": str, "weights":
    the driver's :class:`pipelines.handoff.ResolvedWeights` or None}."""
    logging.basicConfig(level=logging.DEBUG if config.get("verbose") else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logs.quiet_worker_loggers(bool(config.get("verbose")))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = config["cfg"]
    task = task_at(config["task"])  # by import path: the task may be registered only in the driver's process
    torch.manual_seed(int(cfg["train"]["seed"]))
    device = ray.train.torch.get_device()
    threads = int(cfg["scaling"]["torch_threads"])
    if threads:
        torch.set_num_threads(threads)
    log.debug("rank %d of %d on %s with %d torch threads", rank, world, device, torch.get_num_threads())
    model = build_model(task, cfg, config.get("weights"))
    raw_model = model
    optimizer = make_optimizer(task.param_groups(model, cfg), cfg["optim"])
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
    model = ray.train.torch.prepare_model(model)

    epochs = int(cfg["train"]["epochs"])
    batch_size, eval_batch_size = int(cfg["data"]["batch_size"]), int(cfg["data"]["eval_batch_size"])
    fail_at = int(cfg["train"]["inject_failure_at_epoch"])
    val_batch: TensorBatch | None = None
    val_sums: dict[str, torch.Tensor] = {}

    def keep_val_batch(batch: TensorBatch) -> None:
        nonlocal val_batch
        val_batch = batch

    def preview(batch: TensorBatch) -> None:
        if checkpoint is None:  # the run's very first step: where its start-up time ends
            logger.mark({FIRST_STEP_TAG: f"{time.time():.3f}"})
        logger.image(task.render_inputs(_to_numpy(batch), cfg), "plots/train_augmented.png")

    with system_metrics(config["tracking_uri"], config["run_id"], rank, world, resumed=checkpoint is not None):
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            lr = float(cfg["optim"]["lr"]) * lr_factor(cfg["optim"]["schedule"], epoch, epochs)
            set_learning_rate(optimizer, lr)
            train_shard = ray.train.get_dataset_shard("train")
            bar = EpochProgress(epoch, epochs, steps_per_epoch(config["train_rows"], world, batch_size)) \
                if rank == 0 else None
            loss_sums, metric_sums, seen = run_epoch(
                task, model, train_shard.iter_torch_batches(
                    batch_size=batch_size, device=device, local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
                ), cfg, device,
                optimizer=optimizer, on_first_batch=preview if epoch == start_epoch and rank == 0 else None,
                on_step=bar.step if bar else None,
            )
            if bar:
                bar.close()
            train_seconds = time.perf_counter() - started
            val_shard = ray.train.get_dataset_shard("val")
            val_loss, val_metric, _ = run_epoch(
                task, model, val_shard.iter_torch_batches(batch_size=eval_batch_size, device=device), cfg, device,
                on_first_batch=keep_val_batch if epoch == epochs - 1 else None,
            )
            throughput = _all_reduce({"seen": torch.tensor(float(seen)), "seconds": torch.tensor(train_seconds)},
                                     device)
            metrics, _ = _epoch_metrics(task, cfg, "train_", _all_reduce(loss_sums, device),
                                        _all_reduce(metric_sums, device))
            val_sums = _all_reduce(val_metric, device)
            val_metrics, _ = _epoch_metrics(task, cfg, "val_", _all_reduce(val_loss, device), val_sums)
            metrics.update(val_metrics)
            # Workers train concurrently: the epoch's throughput is all examples over the mean worker time.
            metrics["examples_per_sec"] = float(throughput["seen"]) / (float(throughput["seconds"]) / world)
            metrics["lr"] = lr
            metrics["epoch"] = epoch
            history.append(metrics)
            with tempfile.TemporaryDirectory() as directory:
                ckpt = _save_checkpoint(directory, raw_model, optimizer, epoch, history) if rank == 0 else None
                ray.train.report(metrics, checkpoint=ckpt)
            if epoch == fail_at and checkpoint is None:
                raise RuntimeError(f"injected failure after epoch {epoch} (train.inject_failure_at_epoch)")
            logger.epoch(epoch, metrics)
            if rank == 0:
                log.info("epoch %d/%d %s", epoch + 1, epochs,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        logger.finish(task, raw_model, cfg, history, val_batch, val_sums)
