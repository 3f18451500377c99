"""Benchmark raycv's Ray Data input pipeline against a plain per-sample torch DataLoader, side by side in one run.

Both sides read the same demo images (CIFAR-10 pickled batches and hotdog PNG folders written to a temp folder)
and run the task's own ``decode`` and training ``augment`` (cvtasks.tasks), with the same batch size and the same
parallelism (Ray CPUs = DataLoader workers):

- Ray: ``pipelines.data.build_split`` (index, parallel decode, decoded uint8 arrays cached in the object store,
  batch-vectorised augmentation every pass), read with ``Dataset.iter_torch_batches``;
- DataLoader: a map-style Dataset whose ``__getitem__`` decodes and augments one sample (torchvision style:
  nothing cached, so every epoch decodes again), default collate, persistent workers.

Epoch 1 includes building the pipeline (indexing, and for Ray the cached decode; for the DataLoader the worker
start-up); later epochs are the steady state. ``ray.init`` time is reported on its own. The DataLoader runs before
Ray starts so neither side competes with the other's idle processes.

Usage: python benchmarks/bench_data.py [--cifar-train 5000] [--hotdog-per-class 200] [--epochs 3] [--cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, Dataset

from cvtasks.demo import cifar as demo_cifar
from cvtasks.demo import hotdog as demo_hotdog
from cvtasks.tasks import get_task
from cvtasks.tasks.base import Config, Task
from pipelines.config import load_config
from pipelines.data import build_split
from pipelines.report import format_table

log = logging.getLogger("bench_data")

#: The demo's CPU-sized hotdog inputs (pipelines.demo.HOTDOG_CPU); d2l's 224/256 are available via --hotdog-size.
HOTDOG_SIZE, HOTDOG_RESIZE = 64, 72


@dataclass
class Timing:
    """Seconds and images of the first epoch (set-up included) and of the later (steady-state) epochs."""

    first_seconds: float
    first_images: int
    steady_seconds: float
    steady_images: int

    @property
    def first_rate(self) -> float:
        return self.first_images / self.first_seconds

    @property
    def steady_rate(self) -> float:
        return self.steady_images / self.steady_seconds if self.steady_seconds else float("nan")


class PerSampleDataset(Dataset):
    """The task's decode + augment applied to one index row per ``__getitem__``, as torchvision datasets do."""

    def __init__(self, task: Task, cfg: Config, split: str) -> None:
        index = task.index(cfg["data"]["root"], split, cfg)
        self.columns = {col: index[col].to_numpy() for col in index.columns}
        self.task, self.cfg = task, cfg
        self.rng: np.random.Generator | None = None  # created in each worker, after the fork

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.rng is None:
            self.rng = np.random.default_rng()
        decoded = self.task.decode({col: values[i : i + 1] for col, values in self.columns.items()}, self.cfg)
        out = self.task.augment(decoded, True, self.cfg, self.rng)
        return torch.from_numpy(out["image"][0]), int(out["label"][0])


def count_images(batches: Iterable[Any]) -> int:
    """Drain an epoch of batches; the number of images seen."""
    seen = 0
    for batch in batches:
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        seen += int(image.shape[0])
    return seen


def time_epochs(setup: Callable[[], Any], epoch: Callable[[Any], Iterable[Any]], epochs: int) -> Timing:
    """Time ``setup`` plus the first epoch, then the remaining ``epochs - 1`` epochs."""
    started = time.perf_counter()
    state = setup()
    first_images = count_images(epoch(state))
    first_seconds = time.perf_counter() - started
    log.info("  epoch 1: %d images in %.2f s", first_images, first_seconds)
    steady_images, steady_seconds = 0, 0.0
    for e in range(1, epochs):
        started = time.perf_counter()
        images = count_images(epoch(state))
        seconds = time.perf_counter() - started
        log.info("  epoch %d: %d images in %.2f s", e + 1, images, seconds)
        steady_images, steady_seconds = steady_images + images, steady_seconds + seconds
    return Timing(first_seconds, first_images, steady_seconds, steady_images)


def bench_dataloader(task: Task, cfg: Config, workers: int, epochs: int) -> Timing:
    batch_size = int(cfg["data"]["batch_size"])

    def setup() -> DataLoader:
        return DataLoader(PerSampleDataset(task, cfg, "train"), batch_size=batch_size, shuffle=True,
                          num_workers=workers, persistent_workers=workers > 0)

    return time_epochs(setup, iter, epochs)


def bench_ray(task: Task, cfg: Config, epochs: int) -> Timing:
    batch_size = int(cfg["data"]["batch_size"])
    return time_epochs(lambda: build_split(task, cfg, "train", train=True).dataset,
                       lambda ds: ds.iter_torch_batches(batch_size=batch_size), epochs)


def task_configs(root: Path, args: argparse.Namespace) -> list[Config]:
    cifar = load_config("cifar10", overrides=[f"data.root={root}"])
    hotdog = load_config("hotdog", overrides=[f"data.root={root}", f"augment.size={args.hotdog_size}",
                                              f"augment.resize_size={args.hotdog_resize}"])
    for cfg, batch_size in ((cifar, args.cifar_batch), (hotdog, args.hotdog_batch)):
        if batch_size:
            cfg["data"]["batch_size"] = batch_size
    return [cifar, hotdog]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar-train", type=int, default=10000, help="CIFAR-10 demo training images")
    parser.add_argument("--hotdog-per-class", type=int, default=250, help="hotdog demo training PNGs per class")
    parser.add_argument("--hotdog-size", type=int, default=HOTDOG_SIZE, help="hotdog crop side (d2l: 224)")
    parser.add_argument("--hotdog-resize", type=int, default=HOTDOG_RESIZE, help="hotdog eval resize (d2l: 256)")
    parser.add_argument("--cifar-batch", type=int, default=0, help="batch size (0: the task config's)")
    parser.add_argument("--hotdog-batch", type=int, default=0, help="batch size (0: the task config's)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over each split (>= 2: one steady state)")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs = DataLoader workers")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)  # the consumer only counts images; keep the cores for the pipelines under test
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        demo_cifar.write(root, seed=0, n_train=args.cifar_train, n_test=100)
        demo_hotdog.write(root, seed=0, n_train_per_class=args.hotdog_per_class, n_test_per_class=10)
        configs = task_configs(root, args)
        loader: dict[str, Timing] = {}
        for cfg in configs:
            log.info("DataLoader (%d workers): %s", args.cpus, cfg["task"])
            loader[cfg["task"]] = bench_dataloader(get_task(cfg["task"]), cfg, args.cpus, args.epochs)
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        init_seconds = time.perf_counter() - started
        log.info("ray.init: %.2f s", init_seconds)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            rows = []
            for cfg in configs:
                name = cfg["task"]
                log.info("Ray Data (%d CPUs): %s", args.cpus, name)
                ray_timing, dl = bench_ray(get_task(name), cfg, args.epochs), loader[name]
                for phase, r, d in (("epoch 1", ray_timing.first_rate, dl.first_rate),
                                    ("steady", ray_timing.steady_rate, dl.steady_rate)):
                    rows.append([name, cfg["data"]["batch_size"], phase, round(r), round(d), round(r / d, 2)])
        finally:
            ray.shutdown()
    print()
    print(format_table(["task", "batch", "epochs", "Ray img/s", "DataLoader img/s", "Ray/DataLoader"], rows))
    print(f"\nray.init: {init_seconds:.2f} s (not in the rates above); {args.cpus} CPUs each side")


if __name__ == "__main__":
    main(sys.argv[1:])
