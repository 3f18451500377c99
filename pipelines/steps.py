"""The training steps a worker runs, without Ray: optimiser and learning rate, one training pass, one evaluation
pass, and the epoch's metrics summed over workers (``torch.distributed`` where initialised). The Ray Train worker
(:mod:`pipelines.loop`) strings them together; ``benchmarks/`` and the tests call them directly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cvtasks.settings import OptimSection
from cvtasks.tasks.base import Config, Task, TensorBatch

BatchHook = Callable[[TensorBatch], None]
StepHook = Callable[[int, torch.Tensor], None]


def make_optimizer(groups: list[dict[str, Any]], optim: OptimSection) -> torch.optim.Optimizer:
    """Adam or SGD over parameter groups whose ``lr_mult`` scales the base learning rate."""
    param_groups = [{"params": g["params"], "lr_mult": g.get("lr_mult", 1.0)} for g in groups]
    if optim.name == "adam":
        optimizer = torch.optim.Adam(param_groups, lr=optim.lr, weight_decay=optim.weight_decay)
    elif optim.name == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=optim.lr, momentum=optim.momentum,
                                    weight_decay=optim.weight_decay)
    else:
        raise ValueError(f'Unknown optimizer "{optim.name}": use adam or sgd')
    set_learning_rate(optimizer, optim.lr)
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


def channels_last_model(model: nn.Module, enabled: bool) -> nn.Module:
    """``model`` with its 4-D weights in channels-last (NHWC) memory format when ``train.channels_last`` is on.

    Why: on GPUs, cuDNN's convolutions under bfloat16 autocast run on the tensor cores in NHWC; with NCHW weights
    and inputs every convolution pays a transpose in and out. Only the memory layout changes, never a value or a
    shape, so it is applied on every device (on CPU, oneDNN has NHWC kernels too, and the CPU tests exercise this
    path; results agree with NCHW up to float rounding). Call it before DDP wraps the model, so that every rank's
    gradient buckets are laid out for the converted weights: :func:`pipelines.loop.start_worker` calls it on the
    model it builds, before the optimiser and ``prepare_model``. :func:`channels_last_inputs` does the batches.
    """
    return model.to(memory_format=torch.channels_last) if enabled else model


def channels_last_inputs(batch: TensorBatch, enabled: bool) -> TensorBatch:
    """``batch`` with its 4-D floating-point tensors (image batches) in channels-last memory format when
    ``train.channels_last`` is on (see :func:`channels_last_model`); other tensors (labels, boxes, masks) and the
    whole batch when it is off are returned as they are."""
    if not enabled:
        return batch
    return {key: value.contiguous(memory_format=torch.channels_last)
            if value.dim() == 4 and value.is_floating_point() else value for key, value in batch.items()}


def all_reduce(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
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


@dataclass
class PassSums:
    """What one pass over a worker's batches adds up, local to the worker: loss sums, the task's metric sums, the
    examples seen and the seconds it took."""

    loss: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    examples: int
    seconds: float


def train_one_epoch(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[TensorBatch],
                    cfg: Config, device: torch.device, *, on_first_batch: BatchHook | None = None,
                    on_step: StepHook | None = None) -> PassSums:
    """One optimisation pass over ``batches``. ``on_first_batch(batch)`` sees the first batch, ``on_step(examples,
    loss)`` follows every step. Metric sums only where the task computes them on training batches."""
    return _one_pass(task, model, batches, cfg, device, optimizer, on_first_batch, on_step)


def evaluate(task: Task, model: nn.Module, batches: Iterable[TensorBatch], cfg: Config, device: torch.device, *,
             on_first_batch: BatchHook | None = None) -> PassSums:
    """One pass over ``batches`` without gradients, in eval mode."""
    return _one_pass(task, model, batches, cfg, device, None, on_first_batch, None)


def _one_pass(task: Task, model: nn.Module, batches: Iterable[TensorBatch], cfg: Config, device: torch.device,
              optimizer: torch.optim.Optimizer | None, on_first_batch: BatchHook | None,
              on_step: StepHook | None) -> PassSums:
    started = time.perf_counter()
    train = optimizer is not None
    model.train(train)
    loss_acc: dict[str, torch.Tensor] = {}
    metric_acc: dict[str, torch.Tensor] = {}
    seen = 0
    amp, channels_last = cfg.train.amp, cfg.train.channels_last
    with torch.set_grad_enabled(train):
        for step, batch in enumerate(batches):
            if step == 0 and on_first_batch is not None:
                on_first_batch(batch)
            batch = channels_last_inputs(batch, channels_last)
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
    return PassSums(loss_acc, metric_acc, seen, time.perf_counter() - started)


def split_metrics(task: Task, cfg: Config, prefix: str, loss_sums: dict[str, torch.Tensor],
                  metric_sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """A split's metrics from sums over all workers: mean losses and the task's metrics, keys ``prefix``-ed."""
    metrics = {f"{prefix}{k}": v for k, v in _loss_metrics(dict(loss_sums)).items()}
    if metric_sums:
        metrics.update({f"{prefix}{k}": float(v) for k, v in task.summarize(metric_sums, cfg).items()})
    return metrics


def epoch_metrics(task: Task, cfg: Config, train: PassSums, val: PassSums, world: int,
                  device: torch.device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(the epoch's metrics, the validation metric sums) summed over all workers (every rank calls this together)."""
    throughput = all_reduce({"seen": torch.tensor(float(train.examples)), "seconds": torch.tensor(train.seconds)},
                            device)
    metrics = split_metrics(task, cfg, "train_", all_reduce(train.loss, device), all_reduce(train.metrics, device))
    val_sums = all_reduce(val.metrics, device)
    metrics.update(split_metrics(task, cfg, "val_", all_reduce(val.loss, device), val_sums))
    # Workers train concurrently: the epoch's throughput is all examples over the mean worker time.
    metrics["examples_per_sec"] = float(throughput["seen"]) / (float(throughput["seconds"]) / world)
    return metrics, val_sums
