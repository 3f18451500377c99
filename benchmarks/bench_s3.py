"""Benchmark reading many small files from an S3-compatible store against reading them from local disk, in one run.

An image-folder dataset (hotdog, VOC) is thousands of small files, and a Ray Data decode task reads a whole batch
of them, one request each. Against an object store the cost per file is then dominated by the request, not the
bytes, so a reader must not set up a new filesystem object (a new AWS client: a new connection, TLS where there is
one, credential lookup) for every file. ``cvtasks.storage`` keeps one pyarrow filesystem per bucket per process
for that reason; this script measures what that is worth, and what reading a batch's files with a few threads adds.

It starts moto's S3 server on 127.0.0.1 (``tests.services.start_s3_server``), writes a hotdog-style folder of small
PNGs (``hotdog/train/{hotdog,not-hotdog}/*.png``, 3-10 KB each, zlib level 1) to a temp folder, uploads it with
``cvtasks.storage.upload_tree`` and reads every file back:

- local: ``cvtasks.storage.read_bytes`` on the local files (just written, so from the page cache): the anchor, what
  a node with the dataset on its own disk gets;
- S3 cached fs: ``cvtasks.storage.read_bytes`` on ``s3://`` URIs, through the per-bucket filesystem it caches;
- S3 fresh fs per file: ``pyarrow.fs.FileSystem.from_uri`` then ``open_input_stream`` for every file, as raycv read
  before the cache (this mode is slow, so by default it reads an evenly spread sample, ``--fresh-files``);
- S3 cached fs, T threads: the cached reads spread over a thread pool, as a decode task could read a batch.

Plus ``cvtasks.storage.list_dir`` of the class folders, local and on S3. Every mode reads a few files first (warm-up),
then each measurement is repeated ``--repeats`` times, modes taking turns so that load from other processes hits all
alike, and the best time is reported. Rates are files/s and MB/s (1 MB = 10^6 bytes); the ratio columns divide a
mode's files/s by the local one's and by the fresh-filesystem-per-file one's. moto is a Python server on the same
machine, so absolute S3 rates are far below a real store's and the threaded mode gains little where moto and this
script share two busy cores (a real store serves parallel requests in parallel); the cached vs fresh-filesystem
ratio is the point.

Usage: python benchmarks/bench_s3.py [--files 2000] [--threads 8] [--repeats 3] [--fresh-files 200] [--warm-up 16]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from cvtasks import storage
from cvtasks.images import encode_png
from pipelines.report import format_table

# tests.services (the test suite's real S3 server) is not an installed package: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.services import start_s3_server, stop_s3_server  # noqa: E402

log = logging.getLogger("bench_s3")

CLASSES = ("hotdog", "not-hotdog")
SIDE_RANGE = (40, 72)  # image width and height, pixels: with the noise below, PNGs of about 3-10 KB
PIXEL_NOISE = 6.0  # std of per-pixel noise, uint8 levels (what keeps the PNGs from compressing to nothing)
MB = 1e6

Reader = Callable[[Sequence[str]], tuple[int, int]]  # reads (lists) every URI: (files read or entries listed, bytes)


@dataclass
class Mode:
    """One way of reading (or listing) the files; ``best`` is the fastest of the timed repeats."""

    label: str
    run: Reader
    uris: Sequence[str]
    count: int = 0  # files read (entries listed) per repeat
    nbytes: int = 0  # bytes read per repeat (0 for a listing)
    best: float = float("inf")


def png(rng: np.random.Generator) -> bytes:
    """A small RGB PNG: a gradient of a random colour plus pixel noise, random sides in ``SIDE_RANGE``."""
    height, width = (int(side) for side in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full(x.shape, rng.integers(0, 256))], axis=-1)
    return encode_png(np.clip(base + rng.normal(0, PIXEL_NOISE, base.shape), 0, 255).astype(np.uint8))


def write_folder(root: Path, files: int, seed: int) -> list[str]:
    """Write ``files`` PNGs under ``root/<class>/``, classes alternating; their paths relative to ``root``."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    relative = []
    for i in range(files):
        path = f"{CLASSES[i % len(CLASSES)]}/{i:06d}.png"
        (root / path).write_bytes(png(rng))
        relative.append(path)
    return relative


def read_cached(uris: Sequence[str]) -> tuple[int, int]:
    """``cvtasks.storage.read_bytes`` per file, one after the other."""
    return len(uris), sum(len(storage.read_bytes(uri)) for uri in uris)


def read_fresh(uris: Sequence[str]) -> tuple[int, int]:
    """A new pyarrow filesystem per file (``FileSystem.from_uri``), as raycv read before the per-bucket cache."""
    total = 0
    for uri in uris:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            total += len(f.read())
    return len(uris), total


def threaded(threads: int) -> Reader:
    """``cvtasks.storage.read_bytes`` per file on a pool of ``threads`` threads (the cached filesystem is shared)."""

    def read(uris: Sequence[str]) -> tuple[int, int]:
        with ThreadPoolExecutor(threads) as pool:
            return len(uris), sum(len(data) for data in pool.map(storage.read_bytes, uris))

    return read


def list_classes(folders: Sequence[str]) -> tuple[int, int]:
    """``cvtasks.storage.list_dir`` of every folder: the entries found (no bytes read)."""
    return sum(len(storage.list_dir(folder)) for folder in folders), 0


def sample(items: Sequence[str], n: int) -> list[str]:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` is 0 or not smaller)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def measure(modes: Sequence[Mode], repeats: int, warm_up: int) -> None:
    """Warm every mode up on its first ``warm_up`` items, then time ``repeats`` rounds, modes taking turns."""
    for mode in modes:
        mode.run(mode.uris[:warm_up])
    for repeat in range(1, repeats + 1):
        for mode in modes:
            started = time.perf_counter()
            count, nbytes = mode.run(mode.uris)
            seconds = time.perf_counter() - started
            if mode.count and (count, nbytes) != (mode.count, mode.nbytes):
                log.error("%s: %d items / %d bytes, %d / %d in an earlier repeat", mode.label, count, nbytes,
                          mode.count, mode.nbytes)
            mode.count, mode.nbytes, mode.best = count, nbytes, min(mode.best, seconds)
            log.info("repeat %d/%d %-26s %6d items in %7.3f s", repeat, repeats, mode.label, mode.count, seconds)


def table(reads: Sequence[Mode], listings: Sequence[Mode]) -> str:
    """Reads (files/s divided by ``reads[0]``'s, local, and ``reads[2]``'s, fresh filesystem per file), then
    listings (entries/s divided by ``listings[0]``'s, local)."""
    local, fresh = reads[0], reads[2]

    def rate(mode: Mode) -> float:
        return mode.count / mode.best

    rows: list[list[object]] = [
        [mode.label, mode.count, mode.best, round(rate(mode)), mode.nbytes / MB / mode.best, rate(mode) / rate(local),
         rate(mode) / rate(fresh)]
        for mode in reads
    ]
    rows += [[mode.label, mode.count, mode.best, round(rate(mode)), "-", rate(mode) / rate(listings[0]), "-"]
             for mode in listings]
    return format_table(["mode", "files", "seconds", "files/s", "MB/s", "x local", "x fresh fs"], rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="PNGs in the folder (two class folders)")
    parser.add_argument("--threads", type=int, default=8, help="threads of the threaded S3 mode")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per mode (the best is reported)")
    parser.add_argument("--fresh-files", type=int, default=200,
                        help="files the fresh-filesystem-per-file mode reads, spread evenly (0: all)")
    parser.add_argument("--warm-up", type=int, default=16, help="files each mode reads before it is timed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_s3_") as tmp:
        local_dir = Path(tmp) / "hotdog" / "train"
        started = time.perf_counter()
        relative = write_folder(local_dir, args.files, args.seed)
        log.info("wrote %d PNGs to %s in %.2f s", len(relative), local_dir, time.perf_counter() - started)
        server = start_s3_server(Path(tmp) / "s3")
        try:
            os.environ.update(server.env)  # endpoint and dummy credentials, before pyarrow's first S3 filesystem
            base = server.uri("hotdog", "train")
            started = time.perf_counter()
            storage.upload_tree(local_dir, base)
            log.info("upload_tree to %s: %d files in %.2f s (%d threads)", base, len(relative),
                     time.perf_counter() - started, storage.UPLOAD_THREADS)
            local_uris = [str(local_dir / path) for path in relative]
            s3_uris = [storage.join(base, path) for path in relative]
            reads = [
                Mode("local read_bytes", read_cached, local_uris),
                Mode("S3 read_bytes (cached fs)", read_cached, s3_uris),
                Mode("S3 fresh fs per file", read_fresh, sample(s3_uris, args.fresh_files)),
                Mode(f"S3 cached fs, {args.threads} threads", threaded(args.threads), s3_uris),
            ]
            listings = [
                Mode("list_dir local", list_classes, [str(local_dir / name) for name in CLASSES]),
                Mode("list_dir S3", list_classes, [storage.join(base, name) for name in CLASSES]),
            ]
            measure(reads, args.repeats, args.warm_up)
            measure(listings, args.repeats, len(CLASSES))
            for mode in (reads[1], reads[3]):
                if mode.nbytes != reads[0].nbytes:
                    log.error("%s read %d bytes, local %d", mode.label, mode.nbytes, reads[0].nbytes)
        finally:
            stop_s3_server(server)
    print()
    print(table(reads, listings))
    print(f"\nBest of {args.repeats} per mode, {os.cpu_count()} CPUs, moto S3 server on 127.0.0.1 (same machine); "
          f"list_dir rows list the {len(CLASSES)} class folders (files = entries, x local vs local listing).")


if __name__ == "__main__":
    main(sys.argv[1:])
