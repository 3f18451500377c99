"""Peak object-store use of raycv's VOC pipeline at VOC scale, under a deliberately small object store.

Writes a synthetic VOC2012 (``cvtasks.demo.voc``: 2,913 scenes, as many as VOC2012's segmentation train + val, with
sides drawn from [375, 500] px, about VOC's 500x375 pixels per image) to a temporary folder, starts a local Ray
with a small object store, builds the training split with ``pipelines.data.build_split`` under ``data.cache: auto``
(which caches the decoded split only when it fits in 30% of the store, else streams), and iterates one epoch of
batches as a Ray Train worker would, sampling the object store's use every ``SAMPLE_SECONDS``.

Prints the peak object-store bytes against the decoded size of the split and the store's capacity, plus what was
spilled to disk and how far system memory rose.

Measured on the 2-CPU dev machine (2,913 images, ~2.2 GB decoded, crop 320x480, batch 32, one epoch streamed):
    300 MB store: peak 290 MB in the store (97%), nothing over capacity, 3.8 GB spilled over the epoch; before blocks
                  were sized to the store: peak 645 MB (516 MB mmapped past capacity), 8.5 GB spilled
    1 GB store:   peak 601 MB (60%), nothing spilled; before: peak 914 MB (91%), 0.4 GB spilled

Usage: python benchmarks/bench_voc_memory.py [--images 2913] [--object-store-mb 300] [--crop 320 480]
                                             [--data-dir DIR (reuse/keep the dataset)] [--cache auto|memory|stream]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray
from ray._private import internal_api

from cvtasks.demo import voc as voc_demo
from cvtasks.tasks import get_task
from pipelines.config import load_config
from pipelines.data import build_split, row_bytes, should_cache

log = logging.getLogger("bench_voc_memory")

VOC_SEGMENTATION_IMAGES = 2913  # VOC2012 ImageSets/Segmentation train (1,464) + val (1,449)
VAL_IMAGES = 8  # the val split is not iterated; the writer needs one
SIDE_RANGE = (375, 500)  # height and width drawn independently: mean ~437x437 px, about VOC's 500x375
D2L_CROP = (320, 480)  # d2l's VOC crop (height, width)
SAMPLE_SECONDS = 0.25
MB = 1 << 20


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


def write_dataset(root: Path, images: int) -> None:
    marker = root / f".bench-{images}"
    if marker.exists():
        log.info("reusing the dataset at %s", root)
        return
    start = time.perf_counter()
    log.info("writing %d synthetic VOC scenes to %s ...", images, root)
    voc_demo.write(root, seed=0, n_train=images, n_val=VAL_IMAGES, min_side=SIDE_RANGE[0], max_side=SIDE_RANGE[1])
    marker.touch()
    log.info("wrote the dataset in %.0f s", time.perf_counter() - start)


def run(root: Path, images: int, object_store_mb: int, crop: tuple[int, int], cache: str) -> None:
    cfg = load_config("voc", overrides=[
        f"data.root={root}", f"data.cache={cache}", f"augment.crop_size=[{crop[0]}, {crop[1]}]",
        "augment.small=pad",  # keep all 2,913 images whatever their size (d2l's filter would drop some)
    ])
    task = get_task("voc")
    ray.init(num_cpus=psutil.cpu_count(), object_store_memory=object_store_mb * MB, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        index = task.index("train", cfg)
        estimate = int(row_bytes(task, cfg, index).decoded * len(index))
        store = ray.available_resources()["object_store_memory"]
        log.info("decoded split ~%.0f MB; object store %.0f MB -> auto would %s", estimate / MB, store / MB,
                 "cache" if should_cache("auto", estimate, store) else "stream")
        baseline = private_memory()
        with StoreSampler() as sampler:
            start = time.perf_counter()
            split = build_split(task, cfg, "train", train=True)
            rows = 0
            for batch in split.dataset.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy"):
                rows += len(batch["mask"])
            seconds = time.perf_counter() - start
        report(images, rows, seconds, split.cached, estimate, sampler, baseline, crop, cfg)
    finally:
        ray.shutdown()


def report(images: int, rows: int, seconds: float, cached: bool, estimate: int, sampler: StoreSampler,
           baseline: int, crop: tuple[int, int], cfg: dict) -> None:
    """Print the measured numbers for people (benchmark output)."""
    print(f"VOC-scale pipeline: {images} images (sides {SIDE_RANGE[0]}-{SIDE_RANGE[1]} px), crop {crop[0]}x{crop[1]}, "
          f"batch {cfg.data.batch_size}, data.cache={cfg.data.cache} -> "
          f"{'cached' if cached else 'streamed'}")
    print(f"one epoch: {rows} rows in {seconds:.1f} s ({rows / seconds:.1f} images/s), {sampler.samples} samples")
    print(f"decoded split (estimate):      {estimate / MB:9.0f} MB")
    print(f"object store capacity:         {sampler.capacity / MB:9.0f} MB")
    print(f"peak object store use:         {sampler.peak_used / MB:9.0f} MB  "
          f"= {sampler.peak_used / estimate:.1%} of the decoded split, {sampler.peak_used / sampler.capacity:.1%} "
          f"of the store")
    print(f"peak over-capacity (fallback): {sampler.peak_fallback / MB:9.0f} MB")
    print(f"spilled / restored:            {sampler.spilled / MB:9.0f} / {sampler.restored / MB:.0f} MB")
    print(f"peak private memory:           {sampler.peak_private / MB:9.0f} MB  (driver + Ray processes, resident "
          f"minus shared; {baseline / MB:.0f} MB before the pipeline started)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=VOC_SEGMENTATION_IMAGES)
    parser.add_argument("--object-store-mb", type=int, default=300)
    parser.add_argument("--crop", type=int, nargs=2, default=list(D2L_CROP), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--cache", default="auto", choices=["auto", "memory", "stream"])
    parser.add_argument("--data-dir", type=Path, help="write (or reuse) the dataset here and keep it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="raycv-voc-bench-"))
    try:
        write_dataset(root, args.images)
        run(root, args.images, args.object_store_mb, tuple(args.crop), args.cache)
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
