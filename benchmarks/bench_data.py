"""Benchmark raycv's Ray Data input pipeline against a plain per-sample torch DataLoader, side by side in one run.

Both sides read the same demo images (CIFAR-10 pickled batches and hotdog PNG folders written to a temp folder)
and run the task's own ``decode`` and training ``augment`` (cvtasks.tasks), with the same batch size and the same
parallelism (Ray CPUs = DataLoader workers):

- Ray: ``pipelines.data.build_split`` (index, parallel decode, decoded uint8 arrays cached in the object store,
  batch-vectorised augmentation every pass), read with ``Dataset.iter_torch_batches``;
- DataLoader: a map-style Dataset whose ``__getitem__`` decodes and augments one sample (torchvision style:
  nothing cached, so every epoch decodes again), default collate, persistent workers.

Epoch 1 includes building the pipeline (indexing; for Ray the decode into the cache, for the DataLoader its worker
start-up); later epochs are the steady state, alternating DataLoader and Ray epochs so that load from other processes
hits both alike. ``ray.init`` and Ray's worker warm-up (worker processes starting and importing torch, measured by
running both pipelines once on a tiny copy of the data) are once-per-session costs, reported on their own.

Usage: python benchmarks/bench_data.py [--cifar-train 10000] [--hotdog-per-class 250] [--epochs 5] [--cpus 2]
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
from pipelines.data import BLOCKS_PER_CPU, DECODE_BATCH, build_split
from pipelines.report import format_table

log = logging.getLogger("bench_data")

#: The demo's CPU-sized hotdog inputs (pipelines.demo.HOTDOG_CPU); d2l's 224/256 are available via --hotdog-size.
HOTDOG_SIZE, HOTDOG_RESIZE = 64, 72
#: Hotdog images per class of the tiny copy that warms Ray's workers up (its CIFAR copy fills every CPU's blocks).
WARM_UP_HOTDOG = 16


@dataclass
class Timing:
    """Seconds and images of the first epoch (set-up included) and of the later (steady-state) epochs."""

    first_seconds: float = 0.0
    first_images: int = 0
    steady_seconds: float = 0.0
    steady_images: int = 0

    @property
    def first_rate(self) -> float:
        return self.first_images / self.first_seconds

    @property
    def steady_rate(self) -> float:
        return self.steady_images / self.steady_seconds if self.steady_seconds else float("nan")


class PerSampleDataset(Dataset):
    """The task's decode + augment applied to one index row per ``__getitem__``, as torchvision datasets do."""

    def __init__(self, task: Task, cfg: Config, split: str) -> None:
        index = task.index(split, cfg)
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


class Side:
    """One input pipeline under test: ``setup()`` builds it, ``epoch(state)`` yields one pass of batches."""

    def __init__(self, label: str, setup: Callable[[], Any], epoch: Callable[[Any], Iterable[Any]]) -> None:
        self.label, self.setup, self.epoch = label, setup, epoch
        self.state: Any = None
        self.timing = Timing()

    def run_first(self) -> None:
        started = time.perf_counter()
        self.state = self.setup()
        images = count_images(self.epoch(self.state))
        self.timing.first_seconds, self.timing.first_images = time.perf_counter() - started, images
        log.info("%s epoch 1 (with set-up): %d images in %.2f s", self.label, images, self.timing.first_seconds)

    def run_steady(self) -> None:
        started = time.perf_counter()
        images = count_images(self.epoch(self.state))
        seconds = time.perf_counter() - started
        self.timing.steady_seconds += seconds
        self.timing.steady_images += images
        log.info("%s epoch: %d images in %.2f s", self.label, images, seconds)


def dataloader_side(task: Task, cfg: Config, workers: int) -> Side:
    batch_size = cfg.data.batch_size

    def setup() -> DataLoader:
        return DataLoader(PerSampleDataset(task, cfg, "train"), batch_size=batch_size, shuffle=True,
                          num_workers=workers, persistent_workers=workers > 0)

    return Side(f"{task.name} DataLoader", setup, iter)


def ray_side(task: Task, cfg: Config) -> Side:
    batch_size = cfg.data.batch_size
    return Side(f"{task.name} Ray Data", lambda: build_split(task, cfg, "train", train=True).dataset,
                lambda ds: ds.iter_torch_batches(batch_size=batch_size))


def warm_up_ray(configs: list[Config]) -> None:
    """Build each pipeline on a small copy of the data and read it once: starts a Ray worker process per CPU,
    imports the task modules (torch, PIL) there and touches the object store, once-per-session costs that should
    not count against one dataset."""
    for cfg in configs:
        count_images(ray_side(get_task(cfg.task), cfg).setup().iter_torch_batches())


def task_configs(root: Path, args: argparse.Namespace) -> list[Config]:
    cifar = load_config("cifar10", overrides=[f"data.root={root}"])
    hotdog = load_config("hotdog", overrides=[f"data.root={root}", f"augment.size={args.hotdog_size}",
                                              f"augment.resize_size={args.hotdog_resize}"])
    return [cfg.with_values({"data.batch_size": batch_size}) if batch_size else cfg
            for cfg, batch_size in ((cifar, args.cifar_batch), (hotdog, args.hotdog_batch))]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar-train", type=int, default=10000, help="CIFAR-10 demo training images")
    parser.add_argument("--hotdog-per-class", type=int, default=250, help="hotdog demo training PNGs per class")
    parser.add_argument("--hotdog-size", type=int, default=HOTDOG_SIZE, help="hotdog crop side (d2l: 224)")
    parser.add_argument("--hotdog-resize", type=int, default=HOTDOG_RESIZE, help="hotdog eval resize (d2l: 256)")
    parser.add_argument("--cifar-batch", type=int, default=0, help="batch size (0: the task config's)")
    parser.add_argument("--hotdog-batch", type=int, default=0, help="batch size (0: the task config's)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over each split (>= 2: one steady state)")
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
        warm_root = root / "warm-up"
        demo_cifar.write(warm_root, seed=1, n_train=DECODE_BATCH * BLOCKS_PER_CPU * args.cpus, n_test=DECODE_BATCH)
        demo_hotdog.write(warm_root, seed=1, n_train_per_class=WARM_UP_HOTDOG, n_test_per_class=WARM_UP_HOTDOG)
        # DataLoader workers (persistent) fork before Ray starts: a process running Ray should not fork.
        loaders = [dataloader_side(get_task(cfg.task), cfg, args.cpus) for cfg in configs]
        for side in loaders:
            side.run_first()
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        init_seconds = time.perf_counter() - started
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False  # console output only, not speed
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            started = time.perf_counter()
            warm_up_ray(task_configs(warm_root, args))
            warm_seconds = time.perf_counter() - started
            log.info("ray.init %.2f s, worker warm-up %.2f s", init_seconds, warm_seconds)
            rays = [ray_side(get_task(cfg.task), cfg) for cfg in configs]
            for side in rays:
                side.run_first()
            # Steady epochs alternate between the two sides, so load from other processes hits both alike.
            for _ in range(1, args.epochs):
                for loader, ray_pipeline in zip(loaders, rays, strict=True):
                    loader.run_steady()
                    ray_pipeline.run_steady()
        finally:
            ray.shutdown()
    rows = []
    for cfg, loader, ray_pipeline in zip(configs, loaders, rays, strict=True):
        r, d = ray_pipeline.timing, loader.timing
        for phase, ray_rate, loader_rate in (("epoch 1", r.first_rate, d.first_rate),
                                             ("steady", r.steady_rate, d.steady_rate)):
            rows.append([cfg.task, cfg.data.batch_size, phase, round(ray_rate), round(loader_rate),
                         round(ray_rate / loader_rate, 2)])
    print()
    print(format_table(["task", "batch", "epochs", "Ray img/s", "DataLoader img/s", "Ray/DataLoader"], rows))
    print(f"\n{args.cpus} CPUs each side. Not in the rates: ray.init {init_seconds:.2f} s; Ray worker warm-up "
          f"(start-up, imports; both pipelines on a tiny copy) {warm_seconds:.2f} s.")


if __name__ == "__main__":
    main(sys.argv[1:])
