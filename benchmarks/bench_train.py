"""Benchmark Ray Train against a plain single-process PyTorch loop at its best, side by side in one run.

For each task (``--tasks``, default CIFAR-10 and banana detection): the same demo data (written to a temp folder
in the real format), the same model (``task.build_model``), optimizer and per-worker batch size on both sides:

- plain: the training split decoded once into in-memory uint8 arrays, then ``pipelines.steps.train_one_epoch`` --
  the very step Ray Train workers run -- over shuffled batches in this one process, no Ray at all, at every torch
  thread count from 1 to ``--cpus``. Two anchors:

  * **plain + augment**: each batch gets the task's training ``augment`` (fresh randomness per epoch, as Ray
    Data's map tasks give it) inside the timed pass, as a one-process loop must. This is the like-for-like anchor.
  * **plain, no augment**: the evaluation transform applied once, outside the timing: training compute alone, an
    upper bound no input pipeline can beat on the same cores.

  The anchor is the **fastest** thread count of each (on 2 cores usually 2 threads; reported, not assumed).
- Ray Train: ``pipelines.train.run_training`` with 1 worker computing on ``--cpus`` torch threads
  (``scaling.torch_threads``, as ``make demo`` runs single workers), augmenting in the worker (``data.augment_on:
  worker``, the CPU default) and in Ray Data's tasks (``pipeline``), and with 2 DDP workers augmenting in the
  workers; Ray Data decodes once into the object store, MLflow tracking to a temp sqlite store; examples/sec are
  the ``examples_per_sec`` the loop reports per epoch (training pass only), read back from MLflow. Workers
  reserve at most 1 CPU each and leave 1 of the ``--cpus`` to Ray Data.

The plain loop with augmentation also runs while the local Ray is up but idle, before the Ray runs: Ray's own
processes (raylet, GCS, dashboard, agents) wake up many times a second, and on 2 cores each wake-up stalls a torch
thread team. That anchor shows how much of the gap is the price of having Ray running at all; it is reported
beside, not instead of, the anchor without Ray.

Each plain loop runs before and after the Ray runs and the anchor uses the mean of the two, so a change in load
from other processes shows as a spread. Epoch 1 is reported apart from the steady state (epochs 2+), and as a
ratio of the steady state. Ray's start-up time and each run's wall time (worker start-up, checkpoints, MLflow model
logging) are reported too.

Usage: python benchmarks/bench_train.py [--tasks cifar10,banana] [--train-images 1500] [--epochs 3] [--cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from mlflow.tracking import MlflowClient

from cvtasks.demo import banana as demo_banana
from cvtasks.demo import cifar as demo_cifar
from cvtasks.tasks import get_task
from cvtasks.tasks.base import Batch, Config, Task, TensorBatch
from pipelines.cluster import connect
from pipelines.config import load_config
from pipelines.report import format_table
from pipelines.steps import make_optimizer, train_one_epoch
from pipelines.train import run_training

log = logging.getLogger("bench_train")

EXAMPLES_KEY = "examples_per_sec"

#: How each benchmarked task's demo data is written: (root, train images, val images) -> dataset folder.
DEMO_WRITERS: dict[str, Callable[[Path, int, int], Path]] = {
    "cifar10": lambda root, n_train, n_val: demo_cifar.write(root, seed=0, n_train=n_train, n_test=n_val),
    "banana": lambda root, n_train, n_val: demo_banana.write(root, seed=0, n_train=n_train, n_val=n_val),
}


@dataclass
class Result:
    label: str
    threads: int
    rates: list[float]  # examples/sec of each epoch's training pass
    wall_seconds: float

    @property
    def steady(self) -> float:
        """Examples/sec over epochs 2+ (equal examples per epoch: the harmonic mean of the epoch rates)."""
        later = self.rates[1:]
        return len(later) / sum(1.0 / r for r in later) if later else float("nan")


def decoded_split(task: Task, cfg: Config) -> Batch:
    """The whole training split decoded once (what Ray Data caches in the object store), as numpy arrays."""
    index = task.index("train", cfg)
    return task.decode({col: index[col].to_numpy() for col in index.columns}, cfg)


def shuffled_batches(task: Task, decoded: Batch, cfg: Config, augment: bool, rng: np.random.Generator
                     ) -> list[Batch]:
    """One epoch's batches in a fresh order; augmented here only when ``augment`` is off (the evaluation
    transform, outside the timed pass); with it on, ``timed_batches`` augments each batch inside the pass."""
    order = rng.permutation(len(next(iter(decoded.values()))))
    size = cfg.data.batch_size
    batches = [{k: v[order[i : i + size]] for k, v in decoded.items()} for i in range(0, len(order), size)]
    return batches if augment else [task.augment(b, False, cfg, rng) for b in batches]


def timed_batches(task: Task, batches: list[Batch], cfg: Config, augment: bool, rng: np.random.Generator
                  ) -> Iterator[TensorBatch]:
    """Tensor batches as ``train_one_epoch`` consumes them: augmenting each one when it is drawn (so its cost is in
    the pass's seconds, as a one-process loop pays it)."""
    for batch in batches:
        ready = task.augment(batch, True, cfg, rng) if augment else batch
        yield {key: torch.from_numpy(np.ascontiguousarray(ready[key])) for key in task.tensor_keys}


def bench_plain(cfg: Config, decoded: Batch, threads: int, augment: bool, when: str) -> Result:
    """``train_one_epoch`` over in-memory batches in this process; times the training pass of each epoch."""
    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    task = get_task(cfg.task)
    model = task.build_model(cfg)
    optimizer = make_optimizer(task.param_groups(model, cfg), cfg.optim)
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(cfg.train.epochs):
        batches = shuffled_batches(task, decoded, cfg, augment, rng)  # outside the timed pass
        sums = train_one_epoch(task, model, optimizer, timed_batches(task, batches, cfg, augment, rng), cfg,
                               torch.device("cpu"))
        rates.append(sums.examples / sums.seconds)
    log.info("%s, %d threads (%s): examples/sec per epoch %s", plain_kind(augment), threads, when,
             [round(r, 1) for r in rates])
    return Result(f"{plain_kind(augment)}, {when}", threads, rates, time.perf_counter() - started)


def plain_kind(augment: bool) -> str:
    """The name of a plain-loop anchor: with the training augmentation in its timed loop, or without any."""
    return "plain + augment" if augment else "plain, no augment"


def cpus_per_worker(cpus: int, workers: int) -> float:
    """Ray CPUs each training worker reserves: at most 1, and at least one CPU left for Ray Data's map tasks (with
    every CPU held by training workers, Ray Data cannot schedule its decode/augment tasks and training waits
    forever for its first batch)."""
    return min(1.0, (cpus - 1) / workers)


def bench_ray_train(cfg: Config, run: RayRun, cpus: int, tracking_uri: str, storage: str) -> Result:
    workers, threads = run.workers, run.threads
    cfg = cfg.with_values({"scaling.workers": workers, "scaling.cpus_per_worker": cpus_per_worker(cpus, workers),
                           "scaling.torch_threads": threads, "data.augment_on": run.augment_on})
    outcome = run_training(cfg, tracking_uri, storage=storage)
    history = sorted(MlflowClient(tracking_uri).get_metric_history(outcome.run_id, EXAMPLES_KEY),
                     key=lambda m: m.step)
    rates = [m.value for m in history]
    label = f"Ray Train, {workers} worker(s) x {cfg.scaling.cpus_per_worker:g} CPU"
    label += f", {threads} torch threads" if threads else ", 1 torch thread"
    label += f", augment in {run.augment_on}"
    log.info("%s: examples/sec per epoch %s", label, [round(r, 1) for r in rates])
    return Result(label, threads or 1, rates, outcome.wall_seconds)


@dataclass(frozen=True)
class RayRun:
    """One Ray Train configuration: ``threads``: torch intra-op threads per worker (0: Ray's one thread for a
    worker of up to 1 CPU); ``augment_on``: ``data.augment_on``, where training batches are augmented."""

    workers: int
    threads: int
    augment_on: str


def ray_runs(cpus: int) -> tuple[RayRun, ...]:
    """What runs on Ray: ``make demo``'s setting (1 worker on every CPU's thread) with augmentation in the worker
    (the CPU default) and in Ray Data's tasks, and 2 DDP workers augmenting their own shards."""
    return RayRun(1, cpus, "worker"), RayRun(1, cpus, "pipeline"), RayRun(2, 0, "worker")


@dataclass
class Anchor:
    """A plain loop's best thread count, from its runs before and after Ray."""

    label: str
    threads: int
    steady: float  # mean of the before and after runs' steady examples/sec at that thread count


def best_anchor(runs: list[Result], label: str) -> Anchor:
    by_threads: dict[int, list[float]] = {}
    for run in runs:
        by_threads.setdefault(run.threads, []).append(run.steady)
    threads, rates = max(by_threads.items(), key=lambda item: sum(item[1]) / len(item[1]))
    return Anchor(label, threads, sum(rates) / len(rates))


def bench_task(task_name: str, args: argparse.Namespace, root: Path) -> tuple[list[list], str]:
    DEMO_WRITERS[task_name](root / task_name, args.train_images, args.val_images)
    overrides = [f"data.root={root / task_name}", f"train.epochs={args.epochs}"]
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    cfg = load_config(task_name, overrides=overrides)
    task = get_task(task_name)
    decoded = decoded_split(task, cfg)
    thread_counts = range(1, args.cpus + 1)

    def plain_runs(augment: bool, when: str) -> list[Result]:
        return [bench_plain(cfg, decoded, threads, augment, when) for threads in thread_counts]

    plain = {augment: plain_runs(augment, "before Ray") for augment in (True, False)}
    started = time.perf_counter()
    connect(num_cpus=args.cpus)  # a local Ray as `raycv train` starts it
    init_seconds = time.perf_counter() - started
    try:
        beside_ray = plain_runs(True, "beside an idle Ray")
        tracking_uri = f"sqlite:///{root / task_name / 'mlflow.db'}"
        storage = str(root / task_name / "ray_results")
        ray_results = [bench_ray_train(cfg, run, args.cpus, tracking_uri, storage) for run in ray_runs(args.cpus)]
    finally:
        ray.shutdown()
    for augment, runs in plain.items():
        runs.extend(plain_runs(augment, "after Ray"))
    augmented, compute = (best_anchor(plain[augment], plain_kind(augment)) for augment in (True, False))
    idle_ray = best_anchor(beside_ray, f"{plain_kind(True)} beside an idle Ray")
    rows = [[task_name, r.label, r.threads, r.rates[0], r.steady, r.rates[0] / r.steady, r.steady / augmented.steady,
             r.steady / idle_ray.steady, r.steady / compute.steady, r.wall_seconds]
            for r in (*plain[True], *beside_ray, *plain[False], *ray_results)]
    summary = (f"{task_name}: {args.train_images} training images x {args.epochs} epochs, batch "
               f"{cfg.data.batch_size}/worker, Ray on {args.cpus} CPUs (Ray start-up {init_seconds:.2f} s, not in "
               "wall s); "
               f"anchors: {augmented.label} at {augmented.threads} threads {augmented.steady:.1f} ex/s, "
               f"{idle_ray.label} at {idle_ray.threads} threads {idle_ray.steady:.1f} ex/s, "
               f"{compute.label} at {compute.threads} threads {compute.steady:.1f} ex/s.")
    return rows, summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="cifar10,banana", help=f"comma-separated, of {', '.join(DEMO_WRITERS)}")
    parser.add_argument("--train-images", type=int, default=1500, help="demo training images per task")
    parser.add_argument("--val-images", type=int, default=300, help="demo validation images (Ray's val pass)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (>= 2: one steady-state epoch)")
    parser.add_argument("--batch-size", type=int, default=0, help="per-worker batch size (0: the config's)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (at least 2: workers + data)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tasks.split(",")) - set(DEMO_WRITERS))
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)} (choose from {', '.join(DEMO_WRITERS)})")
    return args


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    rows, summaries = [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for task_name in args.tasks.split(","):
            task_rows, summary = bench_task(task_name, args, Path(tmp))
            rows += task_rows
            summaries.append(summary)
    print()
    print(format_table(["task", "run", "threads/worker", "epoch 1 ex/s", "steady ex/s", "epoch 1 / steady",
                        "vs plain + augment", "vs plain beside idle Ray", "vs plain, no augment", "wall s"], rows))
    print()
    print("\n".join(summaries))


if __name__ == "__main__":
    main(sys.argv[1:])
