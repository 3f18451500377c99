"""Peak object-store use of raycv's input pipeline at real scale, under a deliberately small object store.

``--task voc`` (the default): writes a synthetic VOC2012 (``cvtasks.demo.voc``: 2,913 scenes, as many as VOC2012's
segmentation train + val, with sides drawn from [375, 500] px, about VOC's 500x375 pixels per image).
``--task cifar10``: writes CIFAR-10 in the real pickled-batch format (``cvtasks.demo.cifar``: 50,000 training images,
CIFAR-10's count). Either goes to a temporary folder (or ``--data-dir``, shared with bench_data.py), then the
benchmark starts a local Ray with a small object store, builds the training split with
``pipelines.data.build_split`` under ``data.cache: auto`` (which caches the decoded split only when it fits in 45%
of the store with what the store holds, else streams), and iterates one epoch of batches as a Ray Train worker
would, sampling the object store's use every ``SAMPLE_SECONDS``.

Prints the peak object-store bytes against the decoded size of the split and the store's capacity, plus what was
spilled to disk and how far system memory rose.

Measured on the 2-CPU dev machine (2,913 images, ~2.2 GB decoded, crop 320x480, batch 32, one epoch streamed):
    300 MB store: peak 290 MB in the store (97%), nothing over capacity, 3.8 GB spilled over the epoch; before blocks
                  were sized to the store: peak 645 MB (516 MB mmapped past capacity), 8.5 GB spilled
    1 GB store:   peak 601 MB (60%), nothing spilled; before: peak 914 MB (91%), 0.4 GB spilled
    Re-measured after VOC's augment became 4.9x cheaper (two runs, 300 MB store): 41.8 and 52.8 s per epoch, peak
                  297 MB (99%), nothing over capacity, 9.6-9.8 GB spilled; the code of the two commits before it,
                  in the same hour: 43.9 and 46.3 s, peak 297 MB, 9.8 and 9.2 GB spilled. So the spill is not this
                  change's; it is more than the 3.8 GB above, measured on older code
    The cause, found later: a streamed training split shuffled its block order after the decode, and Ray Data's
    RandomizeBlockOrder waits for all of its input, so it held the whole decoded split (spilled). Side by side
    (300 MB store): shuffling after the decode 42.3 s, 9.5 GB spilled / 16.5 GB restored; shuffling the index
    blocks before the decode 38.1 s, 3.9 / 4.2 GB; with a 550 MB store 31.7 s, 2.3 GB spilled against 26.3 s and
    nothing. With the masks uint8 instead of int64 too (an augmented row 2.0 MB instead of 3.0 MB), the 300 MB
    store: 31.7 s, peak 290 MB (97%), nothing over capacity, nothing spilled.
CIFAR-10 (``--task cifar10 --images 50000`` / ``100000 --data-dir /tmp/ingest-data``, 75 MB store: Ray's minimum,
so 50,000 images decode to 2.0x the store and 100,000 to 3.9x; streamed, batch 256, one epoch; load average ~1-2):
    50,000:  peak 73 MB in the store (98%), nothing over capacity, 317 MB spilled; private memory 1011 -> 2537 MB
    100,000: peak 73 MB (98%), nothing over capacity, 599 MB spilled; private memory 1167 -> 2840 MB
    100,000 with the index blocks shuffled before the decode (above): 29.2 s, peak 73 MB (97.5%), nothing over
             capacity, 302 MB spilled; private memory 1187 -> 2878 MB
    Before the index was cut to the store's block size (CIFAR's index carries every image's bytes, and
    ``from_pandas`` puts all of it in the store): 50,000: peak 109 MB (145%, 38 MB over capacity); 100,000: peak
    300 MB (400%, 227 MB over capacity). The private-memory rise is mostly the driver's index (~160 MB per 50,000
    images) and the Ray workers' imports, and grows with the index, not the store.

Usage: python benchmarks/bench_voc_memory.py [--task voc|cifar10] [--images 2913|50000]
                                             [--object-store-mb 300|75] [--crop 320 480 (voc)]
                                             [--data-dir DIR (reuse/keep the dataset)] [--cache auto|memory|stream]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray
from scale_data import (
    CIFAR_TRAIN_IMAGES,
    D2L_CROP,
    MB,
    VOC_SEGMENTATION_IMAGES,
    VOC_SIDES,
    StoreSampler,
    cifar_root,
    private_memory,
    voc_root,
)

from cvtasks.tasks import get_task
from cvtasks.tasks.base import Config
from pipelines.config import load_config
from pipelines.data import build_split, cache_room, row_bytes, should_cache

log = logging.getLogger("bench_voc_memory")

#: Per task: default images and object store (MB). Ray's smallest store is 75 MiB: 50,000 CIFAR images decode to
#: ~147 MiB, 2x that store; ``--images 100000`` makes the decoded split ~4x it.
DEFAULTS = {"voc": (VOC_SEGMENTATION_IMAGES, 300), "cifar10": (CIFAR_TRAIN_IMAGES, 75)}


def task_config(task: str, root: Path, crop: tuple[int, int], cache: str) -> Config:
    # The augmented crops stream through the object store (Ray Data augments), the heavier of the two places.
    if task == "cifar10":
        return load_config("cifar10", overrides=[f"data.root={root}", f"data.cache={cache}",
                                                 "data.augment_on=pipeline"])
    return load_config("voc", overrides=[
        f"data.root={root}", f"data.cache={cache}", "data.augment_on=pipeline",
        f"augment.crop_size=[{crop[0]}, {crop[1]}]",
        "augment.small=pad",  # keep all 2,913 images whatever their size (d2l's filter would drop some)
    ])


def run(cfg: Config, images: int, object_store_mb: int) -> None:
    task = get_task(cfg.task)
    ray.init(num_cpus=psutil.cpu_count(), object_store_memory=object_store_mb * MB, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        index = task.index("train", cfg)
        estimate = int(row_bytes(task, cfg, index).decoded * len(index))
        store = ray.available_resources()["object_store_memory"]
        room = cache_room(ray.cluster_resources()["object_store_memory"], store)  # as build_split's rule
        log.info("decoded split ~%.0f MB; object store %.0f MB -> auto would %s", estimate / MB, store / MB,
                 "cache" if should_cache("auto", estimate, room) else "stream")
        baseline = private_memory()
        with StoreSampler() as sampler:
            start = time.perf_counter()
            split = build_split(task, cfg, "train", train=True)
            rows = 0
            for batch in split.dataset.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy"):
                rows += len(batch["image"])
            seconds = time.perf_counter() - start
        report(images, rows, seconds, split.cached, estimate, sampler, baseline, cfg)
    finally:
        ray.shutdown()


def report(images: int, rows: int, seconds: float, cached: bool, estimate: int, sampler: StoreSampler,
           baseline: int, cfg: Config) -> None:
    """Print the measured numbers for people (benchmark output)."""
    if cfg.task == "voc":
        crop = cfg.augment.crop_size
        inputs = (f"VOC-scale pipeline: {images} images (sides {VOC_SIDES[0]}-{VOC_SIDES[1]} px), "
                  f"crop {crop[0]}x{crop[1]}")
    else:
        inputs = f"CIFAR-10 pipeline: {images} images (32x32, pickled batches)"
    print(f"{inputs}, batch {cfg.data.batch_size}, data.cache={cfg.data.cache} -> {'cached' if cached else 'streamed'}")
    print(f"one epoch: {rows} rows in {seconds:.1f} s ({rows / seconds:.1f} images/s), {sampler.samples} samples")
    print(f"decoded split (estimate):      {estimate / MB:9.0f} MB  = {estimate / sampler.capacity:.1f}x the store")
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
    parser.add_argument("--task", choices=sorted(DEFAULTS), default="voc")
    parser.add_argument("--images", type=int, help="training images (default: 2913 VOC, 50000 CIFAR)")
    parser.add_argument("--object-store-mb", type=int, help="object store size (default: 300 VOC, 75 CIFAR)")
    parser.add_argument("--crop", type=int, nargs=2, default=list(D2L_CROP), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--cache", default="auto", choices=["auto", "memory", "stream"])
    parser.add_argument("--data-dir", type=Path, help="write (or reuse) the dataset under here and keep it")
    args = parser.parse_args(argv)
    images = args.images or DEFAULTS[args.task][0]
    store_mb = args.object_store_mb or DEFAULTS[args.task][1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="raycv-memory-bench-"))
    try:
        data = cifar_root(root, images) if args.task == "cifar10" else voc_root(root, images)
        run(task_config(args.task, data, tuple(args.crop), args.cache), images, store_mb)
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
