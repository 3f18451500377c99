"""What the ingest benchmarks share (not a benchmark itself: ``make bench`` runs only ``bench_*.py``).

- The demo datasets at benchmark sizes, written by the demo writers (``cvtasks.demo``) into a folder per dataset and
  size, so that a ``--data-dir`` keeps them between runs and across benchmarks (writing 2,913 VOC-size scenes takes
  minutes): :func:`cifar_root`, :func:`voc_root`, :func:`hotdog_root`.
- :class:`StoreSampler`: peaks of the object store's use, what it spilled, and the resident private memory of the
  driver and every Ray process, sampled in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray
from ray._private import internal_api

from cvtasks.demo import cifar as cifar_demo
from cvtasks.demo import hotdog as hotdog_demo
from cvtasks.demo import voc as voc_demo

log = logging.getLogger("scale_data")

CIFAR_TRAIN_IMAGES = 50_000  # CIFAR-10's training set: data_batch_1..5, 10,000 images each
VOC_SEGMENTATION_IMAGES = 2913  # VOC2012 ImageSets/Segmentation train (1,464) + val (1,449)
VOC_SIDES = (375, 500)  # height and width drawn independently: mean ~437x437 px, about VOC's 500x375
DEMO_VOC_SIDES = (128, 200)  # the demo writer's own sizes
D2L_CROP = (320, 480)  # d2l's VOC crop (height, width)
VAL_IMAGES = 8  # the val split is not iterated; the writers need one
SAMPLE_SECONDS = 0.25
MB = 1 << 20


def _written(folder: Path, write: Callable[[Path], object]) -> Path:
    """``folder`` with ``write(folder)`` done once: a marker file says the writer finished there."""
    marker = folder / ".complete"
    if marker.exists():
        log.info("reusing %s", folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write(folder)
    marker.touch()
    log.info("wrote %s in %.0f s", folder, time.perf_counter() - start)
    return folder


def cifar_root(base: Path, images: int, seed: int = 0) -> Path:
    """A dataset root holding ``cifar-10-batches-py`` with ``images`` training images (real pickle format)."""
    return _written(base / f"cifar-{images}-s{seed}",
                    lambda root: cifar_demo.write(root, seed=seed, n_train=images, n_test=VAL_IMAGES))


def voc_root(base: Path, images: int, sides: tuple[int, int] = VOC_SIDES, seed: int = 0) -> Path:
    """A dataset root holding ``VOCdevkit/VOC2012`` with ``images`` training scenes (JPEG + palette PNG), their
    heights and widths drawn from ``sides``."""
    return _written(base / f"voc-{images}-{sides[0]}-{sides[1]}-s{seed}",
                    lambda root: voc_demo.write(root, seed=seed, n_train=images, n_val=VAL_IMAGES,
                                                min_side=sides[0], max_side=sides[1]))


def hotdog_root(base: Path, per_class: int, seed: int = 0) -> Path:
    """A dataset root holding the hotdog demo's PNG folders with ``per_class`` training images per class."""
    return _written(base / f"hotdog-{per_class}-s{seed}",
                    lambda root: hotdog_demo.write(root, seed=seed, n_train_per_class=per_class,
                                                   n_test_per_class=VAL_IMAGES))


def private_memory() -> int:
    """Resident minus shared bytes (shared: the object store's pages mapped in) of this process and its children."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            info = proc.memory_info()
        except psutil.Error:  # exited between listing and reading
            continue
        total += info.rss - info.shared
    return total


@dataclass
class StoreSampler:
    """Polls the cluster's object-store stats in a thread; keeps the peaks."""

    peak_used: int = 0
    peak_fallback: int = 0  # bytes the store had to mmap outside its capacity (over-full)
    spilled: int = 0
    restored: int = 0
    capacity: int = 0
    samples: int = 0
    peak_private: int = 0  # resident, non-shared memory of this driver and every Ray process it started
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        stats = internal_api.get_memory_info_reply(state).store_stats
        self.peak_used = max(self.peak_used, stats.object_store_bytes_used)
        self.peak_fallback = max(self.peak_fallback, stats.object_store_bytes_fallback)
        self.spilled, self.restored = stats.spilled_bytes_total, stats.restored_bytes_total
        self.capacity = stats.object_store_bytes_avail
        self.peak_private = max(self.peak_private, private_memory())
        self.samples += 1

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def __enter__(self) -> StoreSampler:
        self.sample()
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
