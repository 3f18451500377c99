"""Benchmark Ray Train against a plain single-process PyTorch loop on CIFAR-10, side by side in one run.

Same demo data (CIFAR-10 pickled batches written to a temp folder), same model (d2l's CIFAR ResNet-18,
``cvtasks.models.resnet.cifar_resnet18`` at the config's ``model.width``), same optimizer and per-worker batch size:

- Ray Train: ``pipelines.train.run_training`` with 1 and with 2 DDP workers, and with 1 worker computing on
  ``--cpus`` torch threads (``scaling.torch_threads``, as ``make demo`` runs single workers), Ray Data
  decode/augment feeding each worker's shard, MLflow tracking to a temp sqlite store; examples/sec are the
  ``examples_per_sec`` the loop reports per epoch (training pass only), read back from MLflow. Workers reserve at
  most 1 CPU each and leave 1 of the ``--cpus`` to Ray Data (2 workers on 2 CPUs: 0.5 each);
- plain: the training images decoded and preprocessed once into in-memory tensors (the task's decode and evaluation
  transform), then ``pipelines.steps.train_one_epoch`` -- the very step Ray Train workers run -- over shuffled
  batches of those tensors in this one process, no Ray at all.

The ratio Ray/plain is therefore the cost (or gain, with 2 workers) of Ray Train + Ray Data over the bare compute;
the plain loop runs before and after the Ray runs and the ratio uses the mean of the two.
Epoch 1 is reported apart from the steady state (epochs 2+). ``ray.init`` time and each run's wall time (worker
start-up, checkpoints, MLflow model logging) are reported too.

PyTorch threads: Ray gives each worker of up to 1 CPU one intra-op thread unless ``scaling.torch_threads`` says
otherwise; the plain loop runs with ``--plain-threads``
(default 1: on a loaded 2-core machine, 2 threads made a ResNet step several times slower, not faster).

Usage: python benchmarks/bench_train.py [--train-images 1500] [--epochs 3] [--cpus 2] [--plain-threads 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from mlflow.tracking import MlflowClient

from cvtasks.demo import cifar as demo_cifar
from cvtasks.models.resnet import cifar_resnet18
from cvtasks.tasks import get_task
from cvtasks.tasks.base import Config, TensorBatch
from pipelines.config import load_config
from pipelines.report import format_table
from pipelines.steps import make_optimizer, train_one_epoch
from pipelines.train import run_training

log = logging.getLogger("bench_train")

EXAMPLES_KEY = "examples_per_sec"


@dataclass
class Result:
    label: str
    workers: int
    threads: int
    rates: list[float]  # examples/sec of each epoch's training pass
    wall_seconds: float

    @property
    def steady(self) -> float:
        """Examples/sec over epochs 2+ (equal examples per epoch: the harmonic mean of the epoch rates)."""
        later = self.rates[1:]
        return len(later) / sum(1.0 / r for r in later) if later else float("nan")


def preprocessed_tensors(cfg: Config) -> TensorBatch:
    """The whole training split, decoded and given the evaluation transform once, as tensors."""
    task = get_task(cfg.task)
    index = task.index("train", cfg)
    decoded = task.decode({col: index[col].to_numpy() for col in index.columns}, cfg)
    ready = task.augment(decoded, False, cfg, np.random.default_rng(0))
    return {key: torch.from_numpy(ready[key]) for key in task.tensor_keys}


def shuffled_batches(data: TensorBatch, batch_size: int, generator: torch.Generator) -> list[TensorBatch]:
    order = torch.randperm(len(data["label"]), generator=generator)
    return [{k: v[order[i : i + batch_size]] for k, v in data.items()} for i in range(0, len(order), batch_size)]


def bench_plain(cfg: Config, threads: int, when: str) -> Result:
    """``train_one_epoch`` over in-memory tensors in this process; times the training pass of each epoch."""
    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    task = get_task(cfg.task)
    data = preprocessed_tensors(cfg)
    model = cifar_resnet18(num_classes=len(task.class_names(cfg)), width=cfg.model.width)
    optimizer = make_optimizer(task.param_groups(model, cfg), cfg.optim)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(cfg.train.epochs):
        batches = shuffled_batches(data, cfg.data.batch_size, generator)  # outside the timed pass
        sums = train_one_epoch(task, model, optimizer, batches, cfg, torch.device("cpu"))
        rates.append(sums.examples / sums.seconds)
        log.info("plain epoch %d: %.1f examples/sec", epoch + 1, rates[-1])
    return Result(f"plain PyTorch ({when})", 1, threads, rates, time.perf_counter() - started)


def cpus_per_worker(cpus: int, workers: int) -> float:
    """Ray CPUs each training worker reserves: at most 1, and at least one CPU left for Ray Data's map tasks (with
    every CPU held by training workers, Ray Data cannot schedule its decode/augment tasks and training waits
    forever for its first batch)."""
    return min(1.0, (cpus - 1) / workers)


def bench_ray_train(cfg: Config, workers: int, cpus: int, tracking_uri: str, storage: str, threads: int = 0) -> Result:
    """``threads``: torch intra-op threads per worker (0: Ray's one thread for a worker of up to 1 CPU)."""
    cfg = cfg.with_values({"scaling.workers": workers, "scaling.cpus_per_worker": cpus_per_worker(cpus, workers),
                           "scaling.torch_threads": threads})
    outcome = run_training(cfg, tracking_uri, storage=storage)
    history = sorted(MlflowClient(tracking_uri).get_metric_history(outcome.run_id, EXAMPLES_KEY),
                     key=lambda m: m.step)
    rates = [m.value for m in history]
    label = f"Ray Train, {workers} worker(s) x {cfg.scaling.cpus_per_worker:g} CPU"
    if threads:
        label += f", {threads} torch threads"
    log.info("%s: examples/sec per epoch %s", label, [round(r, 1) for r in rates])
    return Result(label, workers, threads or 1, rates, outcome.wall_seconds)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=1500, help="CIFAR-10 demo training images")
    parser.add_argument("--val-images", type=int, default=500, help="CIFAR-10 demo test images (Ray's val pass)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (>= 2: one steady-state epoch)")
    parser.add_argument("--batch-size", type=int, default=0, help="per-worker batch size (0: the config's)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (at least 2: workers + data)")
    parser.add_argument("--plain-threads", type=int, default=1, help="torch intra-op threads of the plain loop")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        demo_cifar.write(root, seed=0, n_train=args.train_images, n_test=args.val_images)
        overrides = [f"data.root={root}", f"train.epochs={args.epochs}"]
        if args.batch_size:
            overrides.append(f"data.batch_size={args.batch_size}")
        cfg = load_config("cifar10", overrides=overrides)
        # The plain loop runs before and after Ray, so a change in load from other processes shows as a spread.
        plain_before = bench_plain(cfg, args.plain_threads, "before Ray")
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        init_seconds = time.perf_counter() - started
        log.info("ray.init: %.2f s", init_seconds)
        try:
            tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
            storage = str(root / "ray_results")
            results = [bench_ray_train(cfg, workers, args.cpus, tracking_uri, storage, threads)
                       for workers, threads in ((1, 0), (2, 0), (1, args.cpus))]
        finally:
            ray.shutdown()
        plain_after = bench_plain(cfg, args.plain_threads, "after Ray")
    plain_steady = (plain_before.steady + plain_after.steady) / 2
    rows = [[r.label, r.threads, cfg.data.batch_size, r.rates[0], r.steady, r.steady / plain_steady,
             r.wall_seconds] for r in (plain_before, plain_after, *results)]
    print()
    print(format_table(["run", "threads/worker", "batch/worker", "epoch 1 ex/s", "steady ex/s",
                        "steady vs plain (mean)", "wall s"], rows))
    print(f"\n{args.train_images} training images x {args.epochs} epochs, model width {cfg.model.width}, "
          f"Ray on {args.cpus} CPUs; ray.init {init_seconds:.2f} s (not in wall s).")


if __name__ == "__main__":
    main(sys.argv[1:])
